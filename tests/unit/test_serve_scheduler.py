"""The continuous-batching session under the server: requests admitted mid-run decode
exactly as ``generate`` decodes them alone, streamed tokens add up to the result, and
cancelled / invalid requests leave the others untouched."""

from __future__ import annotations

import pytest

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.requests import GenerationRequest, SamplingParams
from idlm.decoding.scheduler import EngineSession
from tests.conftest import MASK_ID, tiny_qwen3
from tests.unit.test_decoding_models import pattern_prompts


@pytest.fixture(scope="module")
def engine() -> DecodingEngine:
    return DecodingEngine(tiny_qwen3(seed=5), MASK_ID, stop_token_ids=[], max_batch_size=3)


def run_until_idle(session: EngineSession, streamed: dict[int, list[int]] | None = None
                   ) -> dict[int, object]:
    results = {}
    while not session.idle:
        events = session.step()
        for handle, tokens in events.tokens.items():
            assert streamed is not None
            streamed.setdefault(handle, []).extend(tokens)
        results.update({result.index: result for result in events.finished})
    return results


def test_requests_joining_a_running_batch_match_generate_alone(engine) -> None:
    prompts = pattern_prompts(6, seed=3)
    sampled = SamplingParams(temperature=0.9, top_k=30, max_new_tokens=15, seed=8)
    requests = [GenerationRequest(prompts[0], "isd", 4, SamplingParams(max_new_tokens=20)),
                GenerationRequest(prompts[1], "ar", 1, SamplingParams(max_new_tokens=9)),
                GenerationRequest(prompts[2], "isd", 2, sampled),
                GenerationRequest(prompts[3], "isd", 3, SamplingParams(max_new_tokens=30)),
                GenerationRequest(prompts[4], "isd", 4, SamplingParams(max_new_tokens=1)),
                GenerationRequest(prompts[5], "isd", 4, SamplingParams(max_new_tokens=12))]
    session = engine.open_session(max_stride=4, max_new_tokens=32)
    streamed: dict[int, list[int]] = {}
    handles = [session.submit(requests[0], stream=True)]
    first = session.step()
    admitted, streamed[handles[0]] = first.admitted, first.tokens[handles[0]]
    for _ in range(3):   # the first request is mid-decode when the rest arrive
        streamed[handles[0]] += session.step().tokens[handles[0]]
    handles += [session.submit(r, stream=True) for r in requests[1:]]
    assert session.waiting == 5 and session.running == 1
    results = run_until_idle(session, streamed)
    assert admitted == [handles[0]]
    for handle, request in zip(handles, requests, strict=True):
        alone = engine.generate([request])[0]
        assert results[handle].token_ids == alone.token_ids
        assert results[handle].stats == alone.stats
        assert streamed[handle] == alone.token_ids
    assert len(results[handles[1]].token_ids) == 9 and results[handles[1]].stats.mode == "ar"


def test_cancel_a_waiting_and_a_running_request(engine) -> None:
    session = engine.open_session(max_stride=3, max_new_tokens=40)
    prompts = pattern_prompts(6, seed=9)
    requests = [GenerationRequest(p, "isd", 3, SamplingParams(max_new_tokens=40))
                for p in prompts]
    handles = [session.submit(r) for r in requests]
    session.step()   # admits three (max_batch_size), three wait
    assert session.running == 3 and session.waiting == 3
    assert session.cancel(handles[4]) and session.cancel(handles[1])
    assert not session.cancel(handles[1]) and not session.cancel(999)
    assert session.running == 2 and session.waiting == 2
    results = run_until_idle(session)
    assert sorted(results) == [handles[0], handles[2], handles[3], handles[5]]
    for handle in results:
        assert results[handle].token_ids == engine.generate([requests[handle]])[0].token_ids


def test_invalid_requests_come_back_as_errors_without_stopping_others(engine) -> None:
    session = engine.open_session(max_stride=3, max_new_tokens=16)
    good = GenerationRequest(pattern_prompts(1, seed=4)[0], "isd", 3,
                             SamplingParams(max_new_tokens=16))
    bad = {"stride N=4 is above this session's largest N=3":
           GenerationRequest([5, 6], "isd", 4),
           "max_new_tokens 17 is above this session's cap of 16":
           GenerationRequest([5, 6], "isd", 2, SamplingParams(max_new_tokens=17)),
           "empty prompt": GenerationRequest([], "ar", 1),
           "contains the MASK token": GenerationRequest([5, MASK_ID], "ar", 1)}
    for message, request in bad.items():
        assert message in session.validate(request)
    handles = {session.submit(request): message for message, request in bad.items()}
    good_handle = session.submit(good)
    results = run_until_idle(session)
    for handle, message in handles.items():
        assert message in results[handle].error and results[handle].finish_reason == "error"
    assert results[good_handle].token_ids == engine.generate([good])[0].token_ids


def test_session_shape_is_checked() -> None:
    engine = DecodingEngine(tiny_qwen3(seed=1), MASK_ID)
    with pytest.raises(ValueError, match="max_stride 17"):
        engine.open_session(max_stride=17)
    session = engine.open_session(max_stride=1)
    assert session.max_new_tokens == engine.context_length and session.shape.width_drafts == 0
    assert "above this session's largest N=1" in session.validate(
        GenerationRequest([3, 4], "isd", 2))
