"""Server-wide counters for ``GET /metrics``: requests, tokens, tokens per forward, queue.

Written by the engine thread (and by handlers for counts), read by handlers; one lock
keeps a snapshot consistent. TPF is total committed tokens / total forwards the finished
requests took part in (as ``stats.aggregate`` computes it), not a mean of ratios.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from idlm.decoding.requests import GenerationResult


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.time()
        self._counts: Counter[str] = Counter()
        self._tried: list[int] = []
        self._accepted: list[int] = []
        self._gauges = {"running": 0, "waiting": 0, "engine_forwards": 0}
        self._busy_s = 0.0

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def add_prompt_tokens(self, tokens: int) -> None:
        self.count("prompt_tokens", tokens)

    def record_step(self, seconds: float, admitted: int, running: int, waiting: int,
                    engine_forwards: int) -> None:
        with self._lock:
            self._counts["steps"] += 1
            self._counts["prefills"] += bool(admitted)
            self._busy_s += seconds
            self._gauges.update(running=running, waiting=waiting,
                                engine_forwards=engine_forwards)

    def record_result(self, result: GenerationResult) -> None:
        stats = result.stats
        with self._lock:
            if not result.ok:
                self._counts["requests_invalid"] += 1
                return
            self._counts["requests_completed"] += 1
            self._counts[f"finish_{result.finish_reason}"] += 1
            self._counts["completion_tokens"] += stats.tokens
            self._counts["request_forwards"] += stats.forwards
            for name in ("full_accept_rounds", "reject_rounds", "cold_start_rounds"):
                self._counts[name] += getattr(stats, name)
            for totals, values in ((self._tried, stats.tried), (self._accepted, stats.accepted)):
                totals.extend([0] * (len(values) - len(totals)))
                for slot, value in enumerate(values):
                    totals[slot] += value

    def snapshot(self, in_flight: int) -> dict[str, Any]:
        with self._lock:
            counts, gauges = dict(self._counts), dict(self._gauges)
            tried, accepted, busy = list(self._tried), list(self._accepted), self._busy_s
        uptime = time.time() - self._started
        tokens, forwards = counts.get("completion_tokens", 0), counts.get("request_forwards", 0)
        names = ("requests_received", "requests_completed", "requests_invalid",
                 "requests_rejected", "requests_cancelled", "requests_failed", "prompt_tokens",
                 "completion_tokens", "request_forwards", "steps", "prefills",
                 "full_accept_rounds", "reject_rounds", "cold_start_rounds",
                 "finish_stop", "finish_stop_string", "finish_length")
        return {
            **{name: counts.get(name, 0) for name in names},
            "tokens_per_forward": tokens / forwards if forwards else 0.0,
            "acceptance": [a / t if t else None for a, t in zip(accepted, tried, strict=True)],
            "running": gauges["running"], "waiting": gauges["waiting"],
            "in_flight": in_flight, "engine_forwards": gauges["engine_forwards"],
            "uptime_s": uptime, "engine_busy_s": busy,
            "completion_tokens_per_s": tokens / uptime if uptime else 0.0,
        }
