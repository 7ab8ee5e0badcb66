"""An OpenAI-compatible chat endpoint as a backend (SGLang, vLLM, ...), with a thread pool
for concurrency, a per-request timeout and retries with exponential backoff.

Thinking mode goes as ``chat_template_kwargs.enable_thinking`` (SGLang's and vLLM's way);
``top_k`` is the servers' extension of the OpenAI schema. A server that splits reasoning
out (``reasoning_content``) gets it put back as ``<think>...</think>`` so scoring treats
every backend alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from idlm.benchmarks.backends import Completion, Messages
from idlm.config.downstream import EvalSampling

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _Retryable(Exception):
    pass


class EndpointBackend:
    """``base_url`` like ``http://127.0.0.1:30000`` (``/v1/chat/completions`` is added)."""

    def __init__(self, base_url: str, model: str = "default", *, name: str = "endpoint",
                 thinking: bool = True, concurrency: int = 8, timeout_s: float = 600.0,
                 retries: int = 3, backoff_s: float = 1.0, api_key: str | None = None,
                 extra_body: dict[str, Any] | None = None) -> None:
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model, self.name, self.thinking = model, name, thinking
        self.concurrency, self.timeout_s = max(1, concurrency), timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.extra_body = dict(extra_body or {})

    @property
    def identity(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, **self.extra_body}

    def generate(self, prompts: Sequence[Messages], sampling: EvalSampling,
                 seeds: Sequence[int] | None = None, thinking: bool | None = None
                 ) -> list[Completion]:
        import httpx

        seeds = list(seeds) if seeds is not None else [sampling.seed] * len(prompts)
        thinking = self.thinking if thinking is None else thinking
        limits = httpx.Limits(max_connections=self.concurrency)
        with httpx.Client(timeout=self.timeout_s, limits=limits, headers=self.headers) as client, \
                ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, client, messages, sampling, seed, thinking)
                       for messages, seed in zip(prompts, seeds, strict=True)]
            return [future.result() for future in futures]

    def request_body(self, messages: Messages, sampling: EvalSampling, seed: int,
                     thinking: bool) -> dict[str, Any]:
        return {"model": self.model, "messages": [dict(m) for m in messages],
                "temperature": sampling.temperature,
                "top_p": 1.0 if sampling.greedy else sampling.top_p,
                "top_k": sampling.top_k if sampling.top_k > 0 and not sampling.greedy else -1,
                "max_tokens": sampling.max_new_tokens, "seed": seed % (1 << 31), "n": 1,
                "chat_template_kwargs": {"enable_thinking": thinking}, **self.extra_body}

    def _one(self, client: Any, messages: Messages, sampling: EvalSampling,
             seed: int, thinking: bool) -> Completion:
        import httpx

        body = self.request_body(messages, sampling, seed, thinking)
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = client.post(self.url, json=body)
                if response.status_code in RETRY_STATUSES:
                    raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
                if response.status_code >= 400:
                    return Completion("", "error", error=f"HTTP {response.status_code}: "
                                                         f"{response.text[:300]}")
                return _completion(response.json())
            except (httpx.TransportError, _Retryable) as error:
                problem = f"{type(error).__name__}: {error}"
            except (ValueError, KeyError, IndexError, TypeError) as error:
                return Completion("", "error", error=f"malformed response: {error!r}")
        return Completion("", "error", error=f"gave up after {self.retries + 1} attempts; "
                                             f"last: {problem}")


def _completion(payload: dict[str, Any]) -> Completion:
    choice = payload["choices"][0]
    message = choice["message"]
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    text = f"<think>\n{reasoning}\n</think>\n\n{content}" if reasoning else content
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    tokens = (payload.get("usage") or {}).get("completion_tokens")
    return Completion(text, finish, completion_tokens=tokens)
