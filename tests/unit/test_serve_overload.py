"""Overload on loopback: 256 clients against a real ``idlm serve`` with a small queue get
only 200 or 429 (never a 5xx or a dropped connection), the server's memory stays bounded,
and it answers normally afterwards (issue 15, item 6)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.unit.test_serve import build_model_dir

CLIENTS = 256
SECONDS = 15.0
MAX_BATCH, MAX_WAITING = 4, 8
# The server holds at most MAX_BATCH + MAX_WAITING requests; what it keeps per refused
# request must not pile up. 150 MB is far above a bounded server's noise (allocator
# arenas, HTTP buffers) and far below what 256 clients x 15 s of queued work would hold.
RSS_GROWTH_LIMIT_MB = 150.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def _client(url: str, deadline: float, statuses: list[int], latencies: list[float],
                  http: httpx.AsyncClient) -> None:
    body = {"model": "tiny", "prompt": "count to ten", "max_tokens": 8, "temperature": 0}
    while time.monotonic() < deadline:
        began = time.monotonic()
        try:
            answer = await http.post(f"{url}/completions", json=body)
        except httpx.HTTPError as error:   # a dropped connection is a failure, not a status
            statuses.append(-1)
            print(f"client error: {error!r}")
            continue
        statuses.append(answer.status_code)
        if answer.status_code == 200:
            latencies.append(time.monotonic() - began)
        else:
            await asyncio.sleep(0.05)   # a refused client retries, as a polite one would


async def _load(url: str) -> tuple[list[int], list[float]]:
    statuses: list[int] = []
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        deadline = time.monotonic() + SECONDS
        await asyncio.gather(*(_client(url, deadline, statuses, latencies, http)
                               for _ in range(CLIENTS)))
    return statuses, latencies


@pytest.mark.slow
def test_256_clients_get_only_200_or_429_and_memory_stays_bounded(tmp_path: Path) -> None:
    from idlm.serving.gate import loadtest

    model = build_model_dir(tmp_path / "model", seed=3)
    port = loadtest.free_port()
    command = loadtest.serve_command(model, "isd", 4, port, None, [
        "--served-model-name", "tiny", "--log-level", "warning", "--max-batch-size",
        str(MAX_BATCH), "--max-waiting", str(MAX_WAITING), "--graceful-shutdown", "1"])
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        loadtest.wait_until_ready(url[:-3], 120, process, tmp_path / "server.log")
        _check_overload(url, process.pid)
    finally:
        loadtest.stop(process)


def _check_overload(url: str, pid: int) -> None:
    warm = httpx.post(f"{url}/completions", timeout=60, json={
        "model": "tiny", "prompt": "warm up", "max_tokens": 8, "temperature": 0})
    assert warm.status_code == 200
    rss_before = _rss_mb(pid)
    statuses, latencies = asyncio.run(_load(url))
    rss_after = _rss_mb(pid)
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"overload: {CLIENTS} clients x {SECONDS:.0f} s: statuses {counts}, admitted "
          f"p99 {p99:.2f} s, RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert set(counts) <= {200, 429}, counts
    assert counts.get(200, 0) > 0 and counts.get(429, 0) > 0, counts
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB
    # Afterwards: nothing left in flight, and a plain request is answered.
    assert httpx.get(f"{url[:-3]}/metrics", timeout=30).json()["in_flight"] == 0
    after = httpx.post(f"{url}/completions", timeout=60, json={
        "model": "tiny", "prompt": "and now", "max_tokens": 4, "temperature": 0})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
