"""Prompt rendering and token-to-text for the server: chat template, incremental decoding
and stop strings (cut from the text as OpenAI does, never streamed past)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from idlm.serving.protocol import APIError

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
    """Turns committed token ids into text deltas.

    Each push decodes the whole completion (cheap next to a forward) and hands out the
    part not yet sent, holding back an unfinished UTF-8 character and any tail that could
    still grow into a stop string.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.token_ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self._holdback = max((len(stop) for stop in self.stops), default=1) - 1

    def push(self, token_ids: Sequence[int]) -> str:
        """New text that is safe to send after ``token_ids`` were committed."""
        self.token_ids += token_ids
        if self.stopped:
            return ""
        text = self._text()
        if text.endswith(INCOMPLETE_CHARACTER):
            return ""
        text, self.stopped = cut_at_stop(text, self.stops)
        end = len(text) if self.stopped else max(self.sent, len(text) - self._holdback)
        return self._take(text, end)

    def finish(self, token_ids: Sequence[int]) -> str:
        """The rest of the text once the request ended with ``token_ids`` in all."""
        self.token_ids = list(token_ids)
        text, _ = cut_at_stop(self._text(), self.stops)
        return "" if self.stopped else self._take(text, len(text))

    def full_text(self, token_ids: Sequence[int]) -> str:
        """The completion's text, cut at a stop string (the non-streaming answer)."""
        self.token_ids = list(token_ids)
        return cut_at_stop(self._text(), self.stops)[0]

    def _text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def _take(self, text: str, end: int) -> str:
        delta = text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta
