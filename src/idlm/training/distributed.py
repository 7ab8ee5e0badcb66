"""Process-group setup: a launched job (deepspeed / torchrun) or a single local process."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

SHARED_MEMORY_OP = "deepspeed_shm_comm"   # DeepSpeed's ShareMemCommBuilder.NAME


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init(device: str) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size).

    Without a launcher we become rank 0 of a world of one, so the same engine code
    path (ZeRO, checkpoints) runs on a laptop, in CI and on a cluster.
    """
    import deepspeed
    import torch.distributed as dist

    rendezvous: dict[str, object] = {}
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # A world of one meets itself through a file, not a port: a free port picked here
        # can be taken by another process before the store binds it (EADDRINUSE, seen
        # with two pipelines on one machine).
        store = Path(tempfile.mkdtemp(prefix="idlm-dist-")) / "store"
        atexit.register(shutil.rmtree, store.parent, True)
        rendezvous = {"init_method": store.as_uri(), "rank": 0, "world_size": 1}
    if not dist.is_initialized():
        _skip_shared_memory_op()
        deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo",
                                   verbose=False, **rendezvous)
        atexit.register(shutdown)
    global _launched_world
    _launched_world = dist.get_world_size()
    return dist.get_rank(), dist.get_world_size()


def _skip_shared_memory_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory collective op.

    On CPUs ``init_distributed`` JIT-compiles that C++ op (``deepspeed_shm_comm``, for
    DeepSpeed's inference all-reduce, which training never calls; without it DeepSpeed uses
    torch.distributed) under a file lock in ~/.cache/torch_extensions: about a minute of
    the first stage on every fresh machine or environment, and a stage killed while it
    compiles leaves the lock behind, so every later training stage waits on it forever.
    DeepSpeed reads which ops it may build from ``deepspeed.ops.__compatible_ops__``, a
    dict it keeps editable for this.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHARED_MEMORY_OP] = False


def shutdown() -> None:
    """Destroy the process group while Python still runs.

    Left to interpreter teardown, gloo's worker threads are destroyed still joinable and
    the C++ runtime aborts the rank ("terminate called without an active exception"),
    which fails a job that has already finished and written its results.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


_launched_world = 1  # the world size this process joined (set by init)


def exit_process(code: int) -> NoReturn:
    """End a stage process with ``code``; a rank of a multi-rank job skips C++ teardown.

    ``destroy_process_group`` does not free a gloo group that DeepSpeed's ZeRO-3 state
    still references: its worker threads outlive Python (seen here after ZeRO-3 runs) and,
    at C++ static teardown, a rank that had finished its job aborted ("terminate called
    without an active exception") in two CI runs (16 local reruns did not show it). A
    launched rank therefore runs the atexit handlers (MLflow's flush, :func:`shutdown`),
    flushes its streams and leaves with ``os._exit``. A single
    process (and any in-process caller) exits normally.
    """
    if _launched_world <= 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def device_for_rank() -> str:
    import torch

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return "cpu"


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
