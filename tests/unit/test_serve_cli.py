"""Admission control (429 when full, cancellation when a client leaves) and the ``idlm
serve`` command: one-line errors before torch loads, a real process that prints its URL,
answers, and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from idlm.cli import main
from tests.unit.test_serve import NAME, build_model_dir, running_server

# Long enough (thousands of steps) that the first two requests are still held when the
# third arrives, however slow the machine; the test cancels them long before they end.
CONTEXT = 16384
LONG = {"model": NAME, "messages": [{"role": "user", "content": "count"}], "stream": True,
        "max_tokens": CONTEXT - 100, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("serve_cli") / "model", seed=1,
                           context=CONTEXT)


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_full_server_answers_429_and_cancels_departed_clients(model_dir) -> None:
    from idlm.decoding.loading import load_engine

    engine = load_engine(model_dir, mode="isd", max_batch_size=1)
    with running_server(engine, max_waiting=1) as url, httpx.Client(timeout=60) as client:
        chat = f"{url}/v1/chat/completions"
        with client.stream("POST", chat, json=LONG) as running, \
                client.stream("POST", chat, json=LONG) as waiting:
            # Keep the line iterators: dropping one closes its connection (a departed client).
            running_lines, waiting_lines = running.iter_lines(), waiting.iter_lines()
            assert next(running_lines).startswith("data: ")   # accepted, decoding
            assert next(waiting_lines).startswith("data: ")   # accepted, queued
            refused = client.post(chat, json={**LONG, "stream": False})
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error" and "1 running, 1 waiting" in \
                error["message"]
            metrics = client.get(f"{url}/metrics").json()
            assert metrics["in_flight"] == 2 and metrics["requests_rejected"] == 1
            assert metrics["requests_cancelled"] == 0
            wait_for(lambda: client.get(f"{url}/metrics").json()["running"] == 1)
            assert next(running_lines) == "" and "content" in next(running_lines)   # decoding
        # Both clients hung up: the server drops their requests instead of finishing them.
        wait_for(lambda: client.get(f"{url}/metrics").json()["in_flight"] == 0)
        metrics = client.get(f"{url}/metrics").json()
        assert metrics["requests_cancelled"] == 2 and metrics["requests_completed"] == 0
        answer = client.post(chat, json={**LONG, "stream": False, "max_tokens": 3})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_a_non_streaming_client_that_leaves_is_cancelled(model_dir) -> None:
    from idlm.decoding.loading import load_engine

    engine = load_engine(model_dir, mode="isd", max_batch_size=2)
    with running_server(engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={**LONG, "stream": False},
                       timeout=0.5)
        metrics = lambda: httpx.get(f"{url}/metrics").json()  # noqa: E731
        wait_for(lambda: metrics()["requests_cancelled"] == 1)
        assert metrics()["in_flight"] == 0 and metrics()["requests_completed"] == 0


@pytest.mark.parametrize(("extra", "message"), [
    (["--mode", "risd"], "needs an adapter"),
    (["--mode", "isd", "--stride", "1"], "stride N=1"),
    (["--mode", "ar", "--adapter", "x"], "only used in mode risd"),
    (["--mode", "risd", "--adapter", "/nonexistent"], "does not exist"),
    (["--port", "70000"], "port 70000"),
    (["--max-batch-size", "0"], "--max-batch-size 0"),
])
def test_bad_arguments_are_one_line(model_dir, capsys, extra, message) -> None:
    assert main(["serve", "--model", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_model_fails_before_torch_loads(tmp_path) -> None:
    code = ("import sys; from idlm.cli import main; "
            f"status = main(['serve', '--model', {str(tmp_path / 'nope')!r}]); "
            "print(status, 'torch' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=60)
    assert completed.stdout.split() == ["2", "False"]
    assert "not a model folder" in completed.stderr and completed.stderr.count("\n") == 1


def test_serve_process_prints_url_answers_and_stops_on_sigterm(model_dir) -> None:
    command = [sys.executable, "-m", "idlm.cli", "serve", "--model", str(model_dir),
               "--mode", "ar", "--port", "0", "--served-model-name", "tiny-ar",
               "--log-level", "warning", "--graceful-shutdown", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stdout.readline()
        assert "ready at http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.split("ready at ")[1].strip()
        assert httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"] == "tiny-ar"
        body = {"model": "tiny-ar", "prompt": "what is", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{url}/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 4
        assert answer["usage"]["decoding"]["mode"] == "ar"
        assert answer["system_fingerprint"] == "idlm-ar"
        with httpx.Client(timeout=60) as client, client.stream(
                "POST", f"{url}/chat/completions", json={**LONG, "model": "tiny-ar"}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)   # with a request in flight
            with pytest.raises(httpx.HTTPError):   # cut off after the grace period
                for _ in lines:
                    pass
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "idlm serve: stopped" in out
