"""The OpenAI-compatible endpoint backend against a stub server on 127.0.0.1: request
body, ordering, concurrency, retries, timeouts and reasoning passthrough."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from idlm.benchmarks.backends import Backend
from idlm.benchmarks.endpoint import EndpointBackend
from idlm.config.downstream import EvalSampling


class StubState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.attempts: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0


def make_handler(state: StubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            with state.lock:
                state.bodies.append(body)
                state.attempts[prompt] += 1
                attempt = state.attempts[prompt]
                state.active += 1
                state.max_active = max(state.max_active, state.active)
            try:
                status, payload = self._answer(prompt, attempt)
            finally:
                # A request stops counting as active before its answer is written: the
                # client may send its next request the moment the answer arrives.
                with state.lock:
                    state.active -= 1
            self._send(status, payload)

        def _answer(self, prompt: str, attempt: int) -> tuple[int, dict]:
            if prompt.startswith("slow"):
                time.sleep(float(prompt.split()[1]))
            if prompt.startswith("flaky") and attempt <= 2:
                return 503, {"error": "overloaded"}
            if prompt.startswith("bad"):
                return 400, {"error": "bad request"}
            message = {"role": "assistant", "content": f"echo: {prompt}"}
            if prompt.startswith("reason"):
                message["reasoning_content"] = "let me think"
            return 200, {"choices": [{"message": message, "finish_reason": "length"
                                      if prompt.startswith("long") else "stop"}],
                         "usage": {"completion_tokens": 7}}

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def stub() -> Iterator[tuple[str, StubState]]:
    state = StubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


PAPER = EvalSampling()  # T=1.0, top-p 0.95, top-k 50


def test_request_body_carries_sampling_and_thinking(stub) -> None:
    url, state = stub
    backend = EndpointBackend(url, "qwen3-8b", thinking=False, concurrency=2)
    assert isinstance(backend, Backend)
    (done,) = backend.generate([user("hi")], PAPER, seeds=[12345])
    assert done.text == "echo: hi" and done.completion_tokens == 7 and done.error is None
    body = state.bodies[0]
    assert body["model"] == "qwen3-8b" and body["messages"] == user("hi")
    assert (body["temperature"], body["top_p"], body["top_k"]) == (1.0, 0.95, 50)
    assert body["max_tokens"] == PAPER.max_new_tokens and body["seed"] == 12345
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    backend.generate([user("hi")], EvalSampling(temperature=0.0), thinking=True)
    assert (state.bodies[1]["top_p"], state.bodies[1]["top_k"]) == (1.0, -1)
    assert state.bodies[1]["chat_template_kwargs"] == {"enable_thinking": True}


def test_order_is_kept_and_requests_overlap(stub) -> None:
    url, state = stub
    backend = EndpointBackend(url, concurrency=4)
    prompts = [user(f"slow 0.2 #{i}") for i in range(8)]
    started = time.perf_counter()
    results = backend.generate(prompts, PAPER)
    elapsed = time.perf_counter() - started
    assert [r.text for r in results] == [f"echo: slow 0.2 #{i}" for i in range(8)]
    assert state.max_active == 4 and elapsed < 1.2  # 8 x 0.2 s one at a time would be 1.6 s


def test_retries_with_backoff_then_success(stub) -> None:
    url, state = stub
    backend = EndpointBackend(url, retries=3, backoff_s=0.01)
    (done,) = backend.generate([user("flaky one")], PAPER)
    assert done.error is None and done.text == "echo: flaky one"
    assert state.attempts["flaky one"] == 3


def test_gives_up_after_the_retries(stub) -> None:
    url, state = stub
    (failed,) = EndpointBackend(url, retries=1, backoff_s=0.01).generate(
        [user("flaky two")], PAPER)
    assert failed.finish_reason == "error" and "gave up after 2 attempts" in failed.error
    assert "503" in failed.error and state.attempts["flaky two"] == 2


def test_timeout_and_client_errors_are_error_completions(stub) -> None:
    url, state = stub
    backend = EndpointBackend(url, timeout_s=0.2, retries=0)
    slow, bad, fine = backend.generate([user("slow 0.5"), user("bad"), user("fine")], PAPER)
    assert slow.error is not None and "Timeout" in slow.error
    assert bad.error.startswith("HTTP 400") and state.attempts["bad"] == 1
    assert fine.text == "echo: fine"


def test_reasoning_is_put_back_as_thinking_and_length_is_reported(stub) -> None:
    url, _ = stub
    reasoned, long = EndpointBackend(url).generate([user("reason"), user("long")], PAPER)
    assert reasoned.text == "<think>\nlet me think\n</think>\n\necho: reason"
    assert long.finish_reason == "length"


def test_unreachable_server_is_an_error_not_a_crash() -> None:
    backend = EndpointBackend("http://127.0.0.1:9", retries=1, backoff_s=0.01, timeout_s=1)
    (failed,) = backend.generate([user("x")], PAPER)
    assert failed.finish_reason == "error" and "ConnectError" in failed.error
