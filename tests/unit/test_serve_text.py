"""Streaming detokenization: deltas add up to the whole text, split UTF-8 characters are
held back, stop strings end the text and are never streamed, even split across tokens."""

from __future__ import annotations

import pytest

from idlm.serving.http.text import TextStream, cut_at_stop
from tests.unit.test_serve import TEXTS

TEXT = "what is 2 plus 3? héllo wörld ✓✓ 2+3=5 → done"


@pytest.fixture(scope="module")
def tokenizer():
    from idlm.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def stream_pieces(tokenizer, ids: list[int], stops: tuple[str, ...], step: int
                  ) -> tuple[list[str], str]:
    stream = TextStream(tokenizer, stops)
    pieces = [stream.push(ids[start:start + step]) for start in range(0, len(ids), step)]
    return pieces, stream.finish(ids)


@pytest.mark.parametrize("step", [1, 2, 5])
def test_deltas_add_up_and_hold_split_characters(tokenizer, step: int) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert any(tokenizer.decode(ids[:end]).endswith("\ufffd")   # tokens split characters
               for end in range(1, len(ids)))
    pieces, rest = stream_pieces(tokenizer, ids, (), step)
    assert "".join(pieces) + rest == TEXT
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(bool(piece) for piece in pieces) > 3   # it really streamed


@pytest.mark.parametrize("stop", ["wörld", "✓", "3=5", "→ done", "absent"])
def test_stop_strings_are_cut_and_never_streamed(tokenizer, stop: str) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    wanted, found = cut_at_stop(TEXT, (stop, "zzz"))
    assert found == (stop != "absent")
    for step in (1, 3):
        pieces, rest = stream_pieces(tokenizer, ids, (stop, "zzz"), step)
        assert "".join(pieces) + rest == wanted
    assert TextStream(tokenizer, (stop,)).full_text(ids) == wanted


def test_special_tokens_are_skipped(tokenizer) -> None:
    ids = tokenizer("hi there", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    pieces, rest = stream_pieces(tokenizer, ids, (), 1)
    assert "".join(pieces) + rest == "hi there"
