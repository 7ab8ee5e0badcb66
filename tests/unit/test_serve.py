"""``idlm serve`` in-process on a free port, driven by the real openai client and httpx:
greedy answers equal ``DecodingEngine.generate``, streaming equals non-streaming, usage
counts, concurrency, stop strings, seeds, OpenAI error bodies and 429 on overload."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from idlm.decoding.requests import GenerationRequest, SamplingParams

TEXTS = [f"user\nwhat is {a} plus {b}?\nassistant\n{a}+{b}={a + b}\n"
         for a in range(12) for b in range(12)]
NAME = "tiny-served"
STRIDE = 3


def build_model_dir(root: Path, texts: list[str] = TEXTS, seed: int = 0,
                    context: int = 1024) -> Path:
    """A random tiny Qwen3 saved with a trained BPE tokenizer (chat template, MASK, eos)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from idlm.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         intermediate_size=64, max_position_embeddings=context,
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@contextmanager
def running_server(engine: Any, **options: Any) -> Iterator[str]:
    """uvicorn on a thread, port 0 (a free one); yields the base URL, stops on exit."""
    from idlm.serving.http.server import build_server
    from idlm.serving.http.settings import ServerSettings

    settings = ServerSettings(**{"model_name": NAME, "mode": "isd", "stride": STRIDE,
                                "port": 0, "log_level": "warning", **options})
    server = build_server(engine, settings, announce=False)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while server.url is None:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield server.url
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    """A second engine on the same weights: what ``generate`` gives, for comparison."""
    from idlm.decoding.loading import load_engine

    return load_engine(model_dir, mode="isd")


@pytest.fixture(scope="module")
def url(model_dir) -> Iterator[str]:
    from idlm.decoding.loading import load_engine

    with running_server(load_engine(model_dir, mode="isd", max_batch_size=4),
                        max_waiting=16) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def chat_ids(tokenizer: Any, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected(reference: Any, prompt_ids: list[int], **sampling: Any) -> tuple[Any, str]:
    request = GenerationRequest(prompt_ids, "isd", STRIDE, SamplingParams(**sampling))
    result = reference.generate([request])[0]
    assert result.ok, result.error
    return result, reference.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def sse(response: httpx.Response) -> list[dict]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# ---------------------------------------------------------------------- answers
def test_models_health_and_metrics(url, client) -> None:
    assert [model.id for model in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert httpx.get(f"{url}/v1/models/other").status_code == 404
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{url}/metrics").json()
    assert metrics["mode"] == "isd" and metrics["stride"] == STRIDE
    assert metrics["max_batch_size"] == 4 and metrics["max_waiting"] == 16


def test_chat_greedy_equals_generate_with_usage(client, reference) -> None:
    question = "what is 3 plus 4?"
    result, text = expected(reference, chat_ids(reference.tokenizer, question),
                            max_new_tokens=20)
    answer = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=20)
    assert answer.choices[0].message.content == text and text
    assert answer.choices[0].finish_reason == ("length" if result.finish_reason == "length"
                                               else "stop")
    prompt_tokens = len(chat_ids(reference.tokenizer, question))
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == len(result.token_ids)
    assert answer.usage.total_tokens == prompt_tokens + len(result.token_ids)
    assert answer.usage.model_extra["decoding"] == json.loads(json.dumps(
        result.stats.as_dict()))
    assert answer.usage.model_extra["decoding"]["stride"] == STRIDE


def test_chat_streaming_equals_the_whole_answer(client, reference) -> None:
    question = "what is 9 plus 1?"
    result, text = expected(reference, chat_ids(reference.tokenizer, question),
                            max_new_tokens=24)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": question}], temperature=0,
        max_completion_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        result.token_ids)
    assert all(c.usage is None for c in chunks[:-1]) and len(chunks) > 3


@pytest.mark.parametrize("stream", [False, True])
def test_completions_with_text_and_token_prompts(url, reference, stream: bool) -> None:
    tokenizer = reference.tokenizer
    ids = tokenizer("what is 5 plus", add_special_tokens=False)["input_ids"]
    result, text = expected(reference, ids, max_new_tokens=15)
    for prompt in ("what is 5 plus", ids):
        body = {"model": NAME, "prompt": prompt, "max_tokens": 15, "temperature": 0,
                "stream": stream, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            if stream:
                chunks = sse(response)
                assert all(c["object"] == "text_completion" for c in chunks)
                got = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
                usage = chunks[-1]["usage"]
            else:
                payload = json.loads(response.read())
                got, usage = payload["choices"][0]["text"], payload["usage"]
        assert got == text
        assert usage["prompt_tokens"] == len(ids)
        assert usage["completion_tokens"] == len(result.token_ids)


def test_continuous_usage_counts_every_chunk_as_guidellm_asks(url, reference) -> None:
    body = {"messages": [{"role": "user", "content": "what is 2 plus 2?"}], "stream": True,
            "max_completion_tokens": 14, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{url}{CHAT}", json=body, timeout=60) as response:
        chunks = sse(response)
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 14
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["decoding"]["tokens"] == 14
    prompt = len(chat_ids(reference.tokenizer, "what is 2 plus 2?"))
    assert all(chunk["usage"]["prompt_tokens"] == prompt for chunk in chunks)


def test_eight_concurrent_clients_each_get_their_own_answer(url, client, reference) -> None:
    questions = [(f"what is {a} plus {a + 2}?", 10 + 2 * a) for a in range(8)]
    wanted = [expected(reference, chat_ids(reference.tokenizer, q), max_new_tokens=m)[1]
              for q, m in questions]
    before = httpx.get(f"{url}/metrics").json()
    barrier, answers = threading.Barrier(8), [None] * 8

    def ask(index: int) -> None:
        question, budget = questions[index]
        barrier.wait()
        answers[index] = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": question}], temperature=0,
            max_tokens=budget).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == wanted
    after = httpx.get(f"{url}/metrics").json()
    assert after["requests_completed"] - before["requests_completed"] == 8
    engine_forwards = after["engine_forwards"] - before["engine_forwards"]
    request_forwards = after["request_forwards"] - before["request_forwards"]
    assert engine_forwards < request_forwards   # requests really shared forwards
    assert after["tokens_per_forward"] == pytest.approx(
        after["completion_tokens"] / after["request_forwards"])


def test_seeded_sampling_matches_generate_and_differs_by_seed(client, reference) -> None:
    question = "what is 7 plus 7?"
    ids = chat_ids(reference.tokenizer, question)
    options = dict(temperature=0.8, top_p=0.9, max_tokens=16)

    def ask(seed: int) -> str:
        return client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": question}], seed=seed,
            extra_body={"top_k": 20}, **options).choices[0].message.content

    _, text = expected(reference, ids, temperature=0.8, top_p=0.9, top_k=20,
                       max_new_tokens=16, seed=1234)
    assert ask(1234) == text == ask(1234)
    assert len({ask(seed) for seed in (1, 2, 3)}) > 1


def test_stop_strings_cut_the_text_streamed_or_not(url, client, reference) -> None:
    prompt = "what is 1 plus"
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=30,
                                     temperature=0).choices[0].text
    start = next(i for i in range(4, len(full) - 2)
                 if full.find(full[i:i + 2]) == i and "\ufffd" not in full[i:i + 2])
    stop = full[start:start + 2]
    answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=30,
                                       temperature=0, stop=[stop, "never-seen"])
    assert answer.choices[0].text == full[:start]
    assert answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=30,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == full[:start]


def test_ignore_eos_and_the_default_budget(url, reference) -> None:
    ids = [reference.tokenizer.eos_token_id + 1] * (reference.context_length - 3)
    body = {"prompt": ids, "temperature": 0, "ignore_eos": True}
    payload = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert payload["usage"]["completion_tokens"] == 3   # the context's room, no max_tokens
    assert payload["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------- errors
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    (CHAT, b'{"messages": [', 400, None, "not valid JSON"),
    (CHAT, b"[1, 2]", 400, None, "must be a JSON object"),
    (CHAT, {"messages": USER, "max_tokens": "lots"}, 400, "max_tokens", "valid integer"),
    (CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature", "valid number"),
    (CHAT, {"messages": USER, "n": 2}, 400, "n", "only n=1"),
    (CHAT, {"model": NAME}, 400, "messages", "Field required"),
    (CHAT, {"messages": []}, 400, "messages", "at least 1"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", ""),
    (CHAT, {"messages": USER, "logprobs": True}, 400, "logprobs", "not supported"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model", "does not exist"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "empty prompt"),
    (COMPLETIONS, {"prompt": [3] * 1024}, 400, "prompt", "leaves no room"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt", "batch of 2"),
    (COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, "stop", "must not be empty"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "message"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(
        url, reference, path: str, body: Any, status: int, param: str | None,
        message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}{path}", content=content, timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"]
    assert "\n" not in error["message"]
    # ignore_eos: at OpenAI's default temperature 1 the random model may sample its eos
    # first, and this checks that the server goes on, not how long the answer is.
    good = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "what", "max_tokens": 2,
                                                   "ignore_eos": True}, timeout=60)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_masked_prompt_and_unknown_route(url, reference) -> None:
    mask = reference.mask_token_id
    response = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": [4, mask]}, timeout=60)
    assert response.status_code == 400 and "MASK" in response.json()["error"]["message"]
    missing = httpx.get(f"{url}/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{url}/health").status_code == 200
