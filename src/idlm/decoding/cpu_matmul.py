"""``inputs @ W`` for the lean forward's fixed weights, by the faster of two CPU libraries.

On CPU torch multiplies fp32 by MKL. For the few rows of a decode step MKL is fast at one
row and slow at a handful: on an AMD EPYC (AVX-512), a 7-row ISD window through the tiny
model's 192 x 1536 gate/up matrix took 103 us against 21 us for one row, where oneDNN with
the weight packed once took 57 us. On other CPUs the order may differ, so neither library
is assumed: for each weight shape and row-count bucket the first call times both, and
every later call takes the faster (within ``MARGIN``, MKL). The choice is made once per
process and shared by every engine in it, so two engines over the same weights run the
same kernel for the same rows (the gated-LoRA test compares their bits).

Only fp32 on CPU takes this path; bf16 already goes through oneDNN, and CUDA through cuBLAS.
"""

from __future__ import annotations

import time

import torch

# Below this many rows MKL won every shape measured (one row: 2-4x faster than oneDNN).
MIN_ROWS = 4
# oneDNN must be this much faster to be taken: a tie keeps torch's own path.
MARGIN = 0.9
TIMED_CALLS = 5

# (in, out, rows bucket) -> whether oneDNN is faster; filled on first use.
_CHOICES: dict[tuple[int, int, int], bool] = {}


def _bucket(rows: int) -> int:
    """Row counts measured together: powers of two (4-7, 8-15, ...)."""
    return 1 << (rows.bit_length() - 1)


def _onednn_usable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Matmul:
    """``inputs [rows, in] @ W [in, out]`` for one weight given as [out, in]."""

    def __init__(self, weight: torch.Tensor) -> None:
        # MKL multiplies a few rows by a contiguous [in, out] matrix about twice as fast as
        # by its transpose (what F.linear does): a copy on CPU, a view elsewhere.
        on_cpu = weight.device.type == "cpu"
        self.weight = weight.t().contiguous() if on_cpu else weight.t()
        self.packed: torch.Tensor | None = None
        if _onednn_usable(weight):
            # The row count is only a layout hint; the packed weight takes any count.
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 8)
        self.key = (weight.shape[1], weight.shape[0])
        # Row count -> the shared choice for its bucket: one dict lookup per call.
        self.faster_by_rows: dict[int, bool] = {}

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        faster = self.faster_by_rows.get(inputs.shape[0])
        if faster is None:
            faster = self.faster_by_rows[inputs.shape[0]] = self._onednn_faster(inputs)
        return self._onednn(inputs) if faster else torch.mm(inputs, self.weight)

    def _onednn(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, self.packed, None, "none", [], "")

    def _onednn_faster(self, inputs: torch.Tensor) -> bool:
        if self.packed is None or inputs.shape[0] < MIN_ROWS:
            return False
        key = (*self.key, _bucket(inputs.shape[0]))
        faster = _CHOICES.get(key)
        if faster is None:
            faster = _CHOICES[key] = self._measure(inputs)
        return faster

    def _measure(self, inputs: torch.Tensor) -> bool:
        """Time both on these inputs, interleaved; the best call of each counts."""
        sample = inputs.contiguous()
        best = {"mkl": float("inf"), "onednn": float("inf")}
        calls = {"mkl": lambda: torch.mm(sample, self.weight),
                 "onednn": lambda: self._onednn(sample)}
        for name in calls:   # warm-up: first calls allocate and JIT
            calls[name]()
        for _ in range(TIMED_CALLS):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - started)
        return best["onednn"] < MARGIN * best["mkl"]


def chosen() -> dict[str, str]:
    """The choices made so far, ``"in x out @ rows+": library`` (for benchmarks' reports)."""
    return {f"{k[0]}x{k[1]}@{k[2]}+": "onednn" if v else "mkl"
            for k, v in sorted(_CHOICES.items())}
