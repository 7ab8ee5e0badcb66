"""Prompt rendering and token-to-text for the server: chat template, incremental decoding
and stop strings (cut from the text as OpenAI does, never streamed past)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from idlm.serving.http.protocol import APIError

INCOMPLETE_CHARACTER = "\ufffd"   # what a decode of a partial UTF-8 sequence ends with


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]],
                    template_kwargs: dict[str, Any] | None,
                    add_generation_prompt: bool = True) -> list[int]:
    """The tokenizer's chat template rendered to text, then encoded without extra specials
    (exactly what the evaluation's in-process backend does)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions",
                       param="messages")
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **(template_kwargs or {}))
    except Exception as error:   # jinja raises its own errors (e.g. roles out of order)
        raise APIError(400, f"the chat template rejected the messages: {error}",
                       param="messages") from None
    return text_ids(tokenizer, text)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    return [int(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one occurred."""
    hits = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class TextStream:
    """Turns committed token ids into text deltas, incrementally.

    Each push decodes only a short window (the tokens since the last emitted boundary,
    as vLLM and TGI do), so a long answer costs O(length), not O(length^2). It holds back
    an unfinished UTF-8 character and any tail that could still grow into a stop string;
    a stop string ends the text just before it.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.token_ids: list[int] = []
        self.text = ""          # decoded so far
        self.sent = 0           # characters of ``text`` handed out
        self.stopped = False
        self._prefix_offset = self._read_offset = 0
        self._holdback = max((len(stop) for stop in self.stops), default=1) - 1

    def push(self, token_ids: Sequence[int]) -> str:
        """New text that is safe to send after ``token_ids`` were committed."""
        self.token_ids += token_ids
        if self.stopped:
            return ""
        window = self.token_ids[self._prefix_offset:]
        before = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        after = self._decode(window)
        if len(after) <= len(before) or after.endswith(INCOMPLETE_CHARACTER):
            return ""
        self.text += after[len(before):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        # A stop string that began before ``sent`` would have been complete, and caught,
        # at an earlier push (the hold-back is as long as the longest stop minus one).
        tail, self.stopped = cut_at_stop(self.text[self.sent:], self.stops)
        end = self.sent + len(tail)
        if not self.stopped:
            end = max(self.sent, end - self._holdback)
        return self._take(end)

    def finish(self, token_ids: Sequence[int]) -> str:
        """The rest of the text once the request ended with ``token_ids`` in all."""
        if self.stopped:
            return ""
        full = self.full_text(token_ids)
        if not full.startswith(self.text[:self.sent]):   # a decode that rewrote its past
            return ""
        self.text = full
        return self._take(len(full))

    def full_text(self, token_ids: Sequence[int]) -> str:
        """The completion's text, cut at a stop string (the non-streaming answer)."""
        self.token_ids = list(token_ids)
        return cut_at_stop(self._decode(self.token_ids), self.stops)[0]

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _take(self, end: int) -> str:
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta
