"""The decoding-algorithm registry: one file per algorithm, found by discovery, and one
verification step shared by the engine and the SGLang window.

A copy of the package with one more module shows that dropping a file in is what adds an
algorithm; the engine's and the window's ``_verify`` are fed the same logits, drafts, q
and counters and must decide the same tokens, greedy and sampled, with argmax rows.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from idlm.decoding import algorithms
from idlm.decoding import bookkeeping as book
from idlm.decoding.acceptance import StepOutcome
from idlm.decoding.batch import CallShape, new_batch
from idlm.decoding.engine import DecodingEngine
from idlm.decoding.kv_cache import RaggedKVCache
from idlm.decoding.requests import (
    DecodingError,
    GenerationRequest,
    SamplingParams,
    request_error,
)
from idlm.serving.sglang import window as sglang_window
from tests.conftest import tiny_qwen3

PACKAGE = Path(algorithms.__file__).parent
VOCAB, MASK, PAD, STRIDE = 40, 39, 0, 3
DRAFTS = STRIDE - 1

JACOBI = '''from idlm.decoding.algorithms.base import Algorithm

ALGORITHM = Algorithm(name="jacobi", summary="a new drafting mode", mode="jacobi",
                      drafts=True, gated=None, proposal="sample")
'''


def test_the_registry_is_the_four_files() -> None:
    files = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))
    assert files == ["ar", "argmax", "base", "isd", "risd"]
    assert algorithms.names() == ("ar", "argmax", "isd", "risd")
    ar, argmax, isd, risd = (algorithms.get(name) for name in algorithms.names())
    assert (ar.drafts, ar.num_drafts(4), ar.stride_error(1), ar.proposal) == (False, 0, None,
                                                                               None)
    assert (isd.num_drafts(4), isd.gated, isd.proposal) == (3, False, "sample")
    assert (risd.num_drafts(4), risd.gated, risd.mode) == (3, True, "isd")
    assert (argmax.gated, argmax.argmax_proposal, isd.argmax_proposal) == (None, True, False)
    assert isd.stride_error(1) == "stride N=1 is invalid for ISD: use 2 <= N <= 16"
    assert risd.stride_error(17) == "stride N=17 is invalid for ISD: use 2 <= N <= 16"
    assert (isd.stride_error(2), isd.stride_error(16)) == (None, None)
    assert algorithms.modes() == ("ar", "isd")
    assert algorithms.proposals() == ("sample", "argmax")
    assert algorithms.systems() == ("ar", "isd", "risd")
    assert all(a.summary and "\n" not in a.summary for a in algorithms.registry().values())


def test_unknown_names_are_one_line_errors() -> None:
    with pytest.raises(DecodingError) as raised:
        algorithms.get("medusa")
    assert str(raised.value) == ("unknown decoding algorithm 'medusa': known are ar, argmax, "
                                 "isd, risd")
    with pytest.raises(DecodingError, match="unknown mode 'risd': use 'ar' or 'isd' "
                                            r"\(risd is isd on a gated model\)"):
        algorithms.for_request("risd", "sample", True)
    with pytest.raises(DecodingError, match="unknown proposal 'nucleus': use 'sample' or "
                                            "'argmax'"):
        algorithms.for_request("isd", "nucleus", False)
    request = GenerationRequest([1, 2], "jacobi", 3)
    assert request_error(request, 64, VOCAB, MASK, False) == (
        "unknown mode 'jacobi': use 'ar' or 'isd' (risd is isd on a gated model)")
    nucleus = GenerationRequest([1, 2], "isd", 3, SamplingParams(proposal="nucleus"))
    assert request_error(nucleus, 64, VOCAB, MASK, False) == (
        "unknown proposal 'nucleus': use 'sample' or 'argmax'")
    with pytest.raises(ValueError, match="unknown proposal 'nucleus'"):
        sglang_window.WindowSpec(STRIDE, MASK, PAD, proposal="nucleus")


def _copy_package(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / name
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return copy


def _forget(package: str) -> None:
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[module]


def test_a_module_dropped_into_the_package_is_an_algorithm(tmp_path, monkeypatch) -> None:
    copy = _copy_package(tmp_path, "algorithms_plus_jacobi", monkeypatch)
    (copy / "jacobi.py").write_text(JACOBI)
    (copy / "_helpers.py").write_text("VALUE = 1\n")    # private: not an algorithm
    importlib.invalidate_caches()
    try:
        found = algorithms.discover([str(copy)], copy.name)
    finally:
        _forget(copy.name)
    assert list(found) == ["ar", "argmax", "isd", "jacobi", "risd"]
    jacobi = found["jacobi"]
    assert (jacobi.mode, jacobi.num_drafts(5), jacobi.stride_error(1)) == (
        "jacobi", 4, "stride N=1 is invalid for JACOBI: use 2 <= N <= 16")
    assert jacobi.serves("jacobi", "sample", True) and jacobi.serves("jacobi", "sample", False)
    assert {name: found[name] for name in algorithms.names()} == algorithms.registry()


def test_a_module_must_export_its_own_algorithm(tmp_path, monkeypatch) -> None:
    copy = _copy_package(tmp_path, "algorithms_misnamed", monkeypatch)
    (copy / "medusa.py").write_text(JACOBI)              # exports "jacobi" as "medusa"
    importlib.invalidate_caches()
    try:
        with pytest.raises(DecodingError, match=r"algorithms_misnamed.medusa must export "
                                                r"ALGORITHM = Algorithm\(name='medusa'"):
            algorithms.discover([str(copy)], copy.name)
    finally:
        _forget(copy.name)


@pytest.mark.parametrize(("mode", "proposal", "gated", "expected"), [
    ("ar", "sample", False, "ar"), ("ar", "argmax", True, "ar"),
    ("isd", "sample", False, "isd"), ("isd", "sample", True, "risd"),
    ("isd", "argmax", False, "argmax"), ("isd", "argmax", True, "argmax"),
])
def test_for_request_resolves_as_the_engine_runs_it(mode, proposal, gated, expected) -> None:
    algorithm = algorithms.for_request(mode, proposal, gated)
    assert algorithm.name == expected
    # The engine's rows: drafts per stride and the argmax flag come from that algorithm.
    request = GenerationRequest([1, 2], mode, STRIDE, SamplingParams(proposal=proposal))
    batch = _batch([request], gated)
    assert batch.num_drafts.tolist() == [0 if mode == "ar" else DRAFTS]
    assert batch.argmax_proposal.tolist() == [expected == "argmax"]
    assert request.num_drafts == algorithm.num_drafts(STRIDE)
    spec = sglang_window.WindowSpec(STRIDE, MASK, PAD, proposal=proposal, gated=gated)
    if mode == "isd":
        assert spec.algorithm == algorithm


def test_the_gate_opens_at_placed_mask_slots_only() -> None:
    """A MASK id already in the context (here the pending token) keeps the gate shut."""
    window = book.step_window(torch.tensor([MASK, 5]), torch.tensor([[0, 0], [8, 9]]),
                              torch.tensor([False, True]), torch.tensor([2, 2]),
                              torch.tensor([10, 20]), MASK, PAD)
    assert window.input_ids.tolist() == [[MASK, MASK, MASK, PAD, PAD], [5, 8, 9, MASK, MASK]]
    assert algorithms.gate(window).tolist() == [[False, True, True, False, False],
                                                [False, False, False, True, True]]
    assert torch.equal(sglang_window.gate(window), algorithms.gate(window).reshape(-1))


# ---------------------------------------------------------------- one verification step
TEMPERATURES = [0.8, 0.0, 1.0, 1.3]
TOP_K, TOP_P, SEEDS = [0, 0, 12, 0], [1.0, 1.0, 0.9, 1.0], [11, 12, 13, 14]
STEPS, CHECKED = [0, 3, 7, 1], [2, 0, 1, 2]


def _batch(requests: list[GenerationRequest], gated: bool):  # noqa: ANN202
    shape = CallShape(DRAFTS, VOCAB, 1, 16, torch.device("cpu"))
    cache = RaggedKVCache(1, len(requests), 1, 1, 32, torch.float32, "cpu")   # never read
    return new_batch(requests, list(range(len(requests))), [16] * len(requests), [], shape,
                     cache, gated=gated)


def _inputs(greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Logits [4, 2D+1, V], drafts [4, D] (some equal the AR argmax) and their q [4, D, V]."""
    generator = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(4, 2 * DRAFTS + 1, VOCAB, generator=generator)
    drafts = torch.randint(0, VOCAB, (4, DRAFTS), generator=generator)
    drafts[::2] = logits[::2, :DRAFTS].argmax(-1)      # rows 0 and 2 are likely accepted
    temperatures = [0.0] * 4 if greedy else TEMPERATURES
    draft_probs = torch.softmax(torch.randn(4, DRAFTS, VOCAB, generator=generator), -1)
    draft_probs.scatter_add_(2, drafts[..., None], torch.full((4, DRAFTS, 1), 0.5))
    for row, temperature in enumerate(temperatures):
        if temperature == 0:   # greedy drafts were argmax picks: one-hot q
            draft_probs[row] = torch.nn.functional.one_hot(drafts[row], VOCAB).float()
    return logits, drafts, draft_probs, temperatures


def _window_verify(logits, drafts, draft_probs, temperatures, proposal) -> StepOutcome:  # noqa: ANN001
    spec = sglang_window.WindowSpec(STRIDE, MASK, PAD, proposal=proposal)
    states = [sglang_window.RowState(drafts[r], draft_probs[r], STEPS[r]) for r in range(4)]
    sampling = sglang_window.RowSampling.from_lists(temperatures, TOP_K, TOP_P, SEEDS)
    return sglang_window._verify(spec, logits, drafts, torch.tensor(CHECKED), states,
                                 sampling, torch.tensor(STEPS))


@pytest.mark.parametrize("greedy", [True, False])
def test_engine_and_sglang_window_verify_alike(greedy: bool) -> None:
    logits, drafts, draft_probs, temperatures = _inputs(greedy)
    proposals = ["sample", "argmax", "sample", "argmax"]   # argmax rows among sampled ones
    requests = [GenerationRequest([1], "isd", STRIDE, SamplingParams(
        temperature=t, top_k=k, top_p=p, seed=s, proposal=proposal))
        for t, k, p, s, proposal in zip(temperatures, TOP_K, TOP_P, SEEDS, proposals,
                                          strict=True)]
    batch = _batch(requests, gated=False)
    batch.drafts, batch.step_index = drafts, torch.tensor(STEPS)
    batch.draft_probs = None if greedy else draft_probs
    engine = DecodingEngine(tiny_qwen3(vocab=VOCAB), MASK, pad_token_id=PAD)
    got = engine._verify(batch, logits, torch.tensor(CHECKED))
    # The window runs one proposal per server: row r is expected from the run with its own.
    runs = {p: _window_verify(logits, drafts, draft_probs, temperatures, p)
            for p in ("sample", "argmax")}
    for field in ("accepted", "token", "all_accepted", "next_drafts"):
        want = torch.stack([getattr(runs[p], field)[r] for r, p in enumerate(proposals)])
        assert torch.equal(getattr(got, field), want), field
    if greedy:
        assert got.next_draft_probs is None and runs["sample"].next_draft_probs is None
        assert torch.equal(got.next_drafts, logits[:, DRAFTS + 1:].argmax(-1))
        return
    assert torch.equal(got.next_draft_probs, runs["sample"].next_draft_probs)
    # Argmax rows propose argmax q; sampled rows draw (here, at least one draw differs).
    mask_argmax = logits[:, DRAFTS + 1:].argmax(-1)
    assert torch.equal(runs["argmax"].next_drafts, mask_argmax)
    assert not torch.equal(runs["sample"].next_drafts, mask_argmax)
    assert got.accepted.tolist() != [0, 0, 0, 0], "some drafts must pass"
