"""bf16 autocast on CPUs, decided by measurement on the machine at hand.

On a CPU with AMX a bf16 matmul is several times faster than fp32; on one without, it is
slower. A profile cannot know which machine it lands on, so ``bf16: auto`` times a few
forward + backward passes of the run's own first micro-batch both ways and keeps the
faster. The bf16 side stops as soon as it has lost: when its warm-up pass alone outlasts
``WARMUP_GIVE_UP`` times fp32's timed passes (on a CPU without bf16 units one bf16 pass
costs 15 fp32 passes: timing three more would waste most of a minute per stage), or when
its timed passes add up to more than fp32's. Weights, optimizer state and checkpoints stay
fp32 either way; the choice is written next to the checkpoints so a resumed run continues
with the same numerics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

CHOICE_FILE = "precision.json"
TIMED_PASSES = 3
# A bf16 warm-up pass (kernel set-up included) longer than this many times fp32's timed
# passes ends the bf16 side: one-time costs do not explain such a gap.
WARMUP_GIVE_UP = 4.0


def cpu_autocast(setting: bool | str, device: str, checkpoint_dir: Path,
                 timed_pass: Callable[[bool], None], rank: int) -> bool:
    """Whether the run computes under bf16 autocast (CPU only; GPUs use DeepSpeed's bf16)."""
    if setting is False or device.startswith("cuda"):
        return False
    if setting is True:
        return True
    record = checkpoint_dir / CHOICE_FILE
    if record.is_file():
        return bool(json.loads(record.read_text())["bf16"])
    fp32 = _time(timed_pass, False)
    seconds = {False: fp32, True: _time(timed_pass, True, loses_after=TIMED_PASSES * fp32)}
    choice = _same_on_every_rank(seconds[True] < seconds[False])
    if rank == 0:
        record.write_text(json.dumps({"bf16": choice, "seconds_per_pass": {
            "fp32": seconds[False], "bf16": seconds[True]}}))
        print(f"[precision] fp32 {seconds[False]:.3f} s/pass, bf16 autocast "
              f"{seconds[True]:.3f} s/pass: training in {'bf16' if choice else 'fp32'}",
              flush=True)
    return choice


def _same_on_every_rank(choice: bool) -> bool:
    """Rank 0's measurement decides for all ranks (each rank timed its own passes)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return choice
    shared = [choice]
    torch.distributed.broadcast_object_list(shared, src=0)
    return bool(shared[0])


def _time(timed_pass: Callable[[bool], None], bf16: bool,
          loses_after: float = float("inf")) -> float:
    """Seconds per timed pass after a warm-up; stops early once the passes have taken more
    than ``loses_after`` (the other side's timed total), or the warm-up more than
    ``WARMUP_GIVE_UP`` times that, and reports what it measured so far."""
    started = time.perf_counter()
    timed_pass(bf16)  # warm-up: kernels, allocator
    warm_up = time.perf_counter() - started
    if warm_up > WARMUP_GIVE_UP * loses_after:
        return warm_up
    started = time.perf_counter()
    for done in range(1, TIMED_PASSES + 1):
        timed_pass(bf16)
        elapsed = time.perf_counter() - started
        if elapsed > loses_after:
            return elapsed / done
    return elapsed / TIMED_PASSES


def probe_pass(model: torch.nn.Module, compute: Callable, rank: int) -> Callable[[bool], None]:
    """One forward + backward of micro-batch (step 0, micro 0); gradients are discarded."""
    def run(bf16: bool) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss, _, _ = compute(model, 0, 0, rank)
        loss.backward()
        for param in model.parameters():
            param.grad = None
    return run
