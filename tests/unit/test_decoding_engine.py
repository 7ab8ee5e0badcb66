"""The engine on real tiny Qwen3 models: ISD == AR, AR == generate, batch independence,
per-request errors, stop conditions and admission of queued requests."""

from __future__ import annotations

import pytest
import torch

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.requests import GenerationRequest, SamplingParams
from idlm.decoding.stats import aggregate
from idlm.decoding.verify import transformers_greedy
from tests.conftest import MASK_ID, tiny_qwen3
from tests.unit.test_decoding_models import pattern_prompts, trained_ic_model

GREEDY = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return trained_ic_model()


def requests(prompts: list[list[int]], mode: str, stride: int = 4,
             sampling: SamplingParams = GREEDY) -> list[GenerationRequest]:
    return [GenerationRequest(p, mode, stride, sampling) for p in prompts]


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_isd_greedy_equals_ar_greedy_on_a_ragged_batch(trained, stride: int) -> None:
    engine = DecodingEngine(trained, MASK_ID, stop_token_ids=[])
    prompts = pattern_prompts(10, seed=11)
    ar = engine.generate(requests(prompts, "ar"))
    isd = engine.generate(requests(prompts, "isd", stride))
    assert [r.token_ids for r in isd] == [r.token_ids for r in ar]
    summary = aggregate(r.stats for r in isd)
    assert summary["full_accept_rounds"] and summary["reject_rounds"]   # a real test
    assert all(len(r.token_ids) == 24 for r in isd)


def test_isd_equals_ar_on_a_random_model_too() -> None:
    model = tiny_qwen3(seed=3)
    engine = DecodingEngine(model, MASK_ID, stop_token_ids=[])
    prompts = pattern_prompts(6, seed=5)
    ar = engine.generate(requests(prompts, "ar"))
    for stride in (2, 4):
        isd = engine.generate(requests(prompts, "isd", stride))
        assert [r.token_ids for r in isd] == [r.token_ids for r in ar]


@pytest.mark.parametrize("use_trained", [True, False])
def test_engine_ar_equals_transformers_generate(trained, use_trained: bool) -> None:
    model = trained if use_trained else tiny_qwen3(seed=4)
    engine = DecodingEngine(model, MASK_ID, stop_token_ids=[5])
    prompts = pattern_prompts(6, seed=7)
    ours = [r.token_ids for r in engine.generate(requests(prompts, "ar"))]
    assert ours == transformers_greedy(model, prompts, 24, [5], engine.pad_token_id)


def test_transformers_reference_batched_by_length_equals_one_prompt_at_a_time(trained) -> None:
    """Prompts of one length share a ``generate`` call (no padding); rows that stop early
    are cut after their stop token as a lone call stops there."""
    prompts = pattern_prompts(12, seed=17, min_length=3, max_length=5)
    assert len({len(p) for p in prompts}) < len(prompts)   # some lengths repeat
    stops = [5, 9]
    batched = transformers_greedy(trained, prompts, 20, stops, 0)
    alone = transformers_greedy(trained, prompts, 20, stops, 0, max_batch_size=1)
    assert batched == alone
    assert any(len(tokens) < 20 for tokens in batched)      # a stop token ended some rows


@pytest.mark.parametrize("mode", ["ar", "isd"])
def test_copies_of_one_prompt_share_the_prefill_and_sample_alone(trained, mode: str) -> None:
    """n samples of one prompt (the exactness checks, a server's n > 1) prefill once; each
    row still samples with its own seed, exactly as it does alone."""
    prompt = pattern_prompts(1, seed=61)[0]
    sampled = [GenerationRequest(prompt, mode, 4, SamplingParams(
        temperature=1.0, max_new_tokens=12, seed=seed)) for seed in range(6)]
    other = GenerationRequest(pattern_prompts(1, seed=62)[0], mode, 4, GREEDY)
    engine = DecodingEngine(trained, MASK_ID, stop_token_ids=[])
    rows_run, forward = [], engine.decode_forward

    def counting(input_ids, *args):  # noqa: ANN001, ANN202
        rows_run.append(input_ids.shape[0])
        return forward(input_ids, *args)

    engine.decode_forward = counting
    together = engine.generate([*sampled[:3], other, *sampled[3:]])
    assert rows_run[0] == 2 and rows_run[1] == 7   # prefill: the two distinct prompts
    engine.decode_forward = forward
    alone = [engine.generate([request])[0] for request in [*sampled[:3], other, *sampled[3:]]]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in together[:3]}) > 1   # the seeds do differ


def test_shared_rows_finds_repeated_prefill_windows() -> None:
    from idlm.decoding.bookkeeping import prefill_window, shared_rows

    prompts = [[4, 5, 6], [7, 8], [4, 5, 6], [4, 5, 6], [7, 8]]
    window = prefill_window(prompts, [3, 3, 3, 3, 3], 3, MASK_ID, 0, "cpu")
    first, inverse = shared_rows(window)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 0, 1]
    assert torch.equal(window.input_ids[first][inverse], window.input_ids)
    # Same ids but fewer drafts is another window (its MASK slots are padding).
    fewer = prefill_window([[4, 5, 6], [4, 5, 6]], [3, 2], 3, MASK_ID, 0, "cpu")
    assert shared_rows(fewer) is None
    assert shared_rows(prefill_window([[4, 5, 6], [7, 8]], [3, 3], 3, MASK_ID, 0, "cpu")) \
        is None


def test_greedy_output_does_not_depend_on_batch_mates(trained) -> None:
    engine = DecodingEngine(trained, MASK_ID, stop_token_ids=[])
    target = GenerationRequest(pattern_prompts(1, seed=21)[0], "isd", 4, GREEDY)
    alone = engine.generate([target])[0]
    mates = requests(pattern_prompts(12, seed=22, max_length=14), "isd", 3)
    mates += requests(pattern_prompts(3, seed=23), "ar")
    mates.append(GenerationRequest([7, 8], "isd", 2, SamplingParams(temperature=1.0, seed=3)))
    for position in (0, 5, len(mates)):
        batch = mates[:position] + [target] + mates[position:]
        together = engine.generate(batch)[position]
        assert together.token_ids == alone.token_ids
        assert together.stats == alone.stats


@pytest.mark.parametrize("mode", ["ar", "isd"])
def test_sampled_output_depends_only_on_the_request_seed(trained, mode: str) -> None:
    engine = DecodingEngine(trained, MASK_ID, stop_token_ids=[])
    sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=16, seed=99)
    target = GenerationRequest([101, 4, 5], mode, 3, sampling)
    alone = engine.generate([target])[0].token_ids
    mates = requests(pattern_prompts(7, seed=31), "isd", 4,
                     SamplingParams(temperature=0.7, max_new_tokens=20, seed=1))
    assert engine.generate(mates[:3] + [target] + mates[3:])[3].token_ids == alone
    other_seeds = {tuple(engine.generate([GenerationRequest(
        [101, 4, 5], mode, 3, SamplingParams(temperature=1.0, max_new_tokens=16, seed=s))])[0]
        .token_ids) for s in range(6)}
    assert len(other_seeds) > 1


def test_bad_requests_fail_alone_and_the_rest_are_unaffected(trained) -> None:
    engine = DecodingEngine(trained, MASK_ID, stop_token_ids=[], context_length=40)
    good = pattern_prompts(2, seed=41)
    batch = [
        GenerationRequest(good[0], "isd", 4, GREEDY),
        GenerationRequest([], "isd", 4, GREEDY),
        GenerationRequest(list(range(1, 41)), "isd", 4, GREEDY),
        GenerationRequest(good[1], "isd", 1, GREEDY),
        GenerationRequest([5, MASK_ID, 6], "isd", 4, GREEDY),
        GenerationRequest([5, 999], "ar", 1, GREEDY),
        GenerationRequest(good[1], "isd", 3, SamplingParams(top_p=0.0)),
        GenerationRequest(good[1], "isd", 3, GREEDY),
    ]
    results = engine.generate(batch)
    errors = [r.error for r in results]
    assert errors[0] is None and errors[-1] is None
    for index, expected in [(1, "empty prompt"), (2, "leaves no room"), (3, "stride N=1"),
                            (4, "contains the MASK token"), (5, "outside the vocabulary"),
                            (6, "top_p")]:
        assert expected in errors[index] and results[index].finish_reason == "error"
        assert "\n" not in errors[index]
    assert results[0].token_ids == engine.generate([batch[0]])[0].token_ids
    assert results[-1].token_ids == engine.generate([batch[-1]])[0].token_ids


def test_context_caps_the_budget(trained) -> None:
    engine = DecodingEngine(trained, MASK_ID, stop_token_ids=[], context_length=20)
    result = engine.generate([GenerationRequest(list(range(1, 16)), "isd", 4, GREEDY)])[0]
    assert len(result.token_ids) == 5 and result.finish_reason == "length"


def test_queued_requests_are_admitted_as_rows_free_up(trained) -> None:
    prompts = pattern_prompts(9, seed=51)
    lengths = [SamplingParams(max_new_tokens=4 + 3 * i) for i in range(9)]
    batch = [GenerationRequest(p, "isd", 2 + i % 3, s)
             for i, (p, s) in enumerate(zip(prompts, lengths, strict=True))]
    wide = DecodingEngine(trained, MASK_ID, stop_token_ids=[]).generate(batch)
    narrow = DecodingEngine(trained, MASK_ID, stop_token_ids=[], max_batch_size=2).generate(batch)
    assert [r.token_ids for r in narrow] == [r.token_ids for r in wide]
    assert [r.index for r in narrow] == list(range(9))


class DigitTokenizer:
    """Decodes ids as space-separated numbers: enough to test stop strings."""

    def decode(self, token_ids: list[int], **_: object) -> str:
        return " ".join(str(t) for t in token_ids)


@pytest.mark.parametrize("mode", ["ar", "isd"])
def test_stop_strings_and_stop_tokens(trained, mode: str) -> None:
    engine = DecodingEngine(trained, MASK_ID, stop_token_ids=[], tokenizer=DigitTokenizer())
    prompt = [101, 10, 11, 12]
    free = engine.generate([GenerationRequest(prompt, mode, 4, GREEDY)])[0].token_ids
    needle = f"{free[5]} {free[6]}"
    by_string = engine.generate([GenerationRequest(prompt, mode, 4, SamplingParams(
        max_new_tokens=24, stop_strings=(needle,)))])[0]
    assert by_string.token_ids == free[:7] and by_string.finish_reason == "stop_string"
    by_token = engine.generate([GenerationRequest(prompt, mode, 4, SamplingParams(
        max_new_tokens=24, stop_token_ids=(free[3],)))])[0]
    assert by_token.token_ids == free[:free.index(free[3]) + 1]
    assert by_token.finish_reason == "stop"
    no_tokenizer = DecodingEngine(trained, MASK_ID).generate([GenerationRequest(
        prompt, "isd", 4, SamplingParams(stop_strings=("x",)))])[0]
    assert "tokenizer" in no_tokenizer.error
