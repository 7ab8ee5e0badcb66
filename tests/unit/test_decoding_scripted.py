"""The engine on a scripted model whose logits are known: exact tokens, KV, positions, stats.

The scripted model answers the true next token at every clean row and, at a MASK row,
the true token one further except at positions the test marks as wrong drafts. So a
greedy ISD run must reproduce the truth exactly, and where and how often it rejects is
known in advance. Its decoder also checks the cache on every forward: the committed
slots of a row must hold exactly the true prefix (no MASK, no rejected draft).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.requests import GenerationRequest, SamplingParams

VOCAB, MASK, PAD = 32, 31, 0


def truth_for(first_token: int, length: int = 64) -> list[int]:
    return [first_token] + [((first_token * 7 + i * 3) % 29) + 1 for i in range(1, length)]


def wrong(token: int) -> int:
    return token % 29 + 1


class ScriptedDecoder(nn.Module):
    def __init__(self, wrong_drafts: dict[int, set[int]]) -> None:
        super().__init__()
        self.wrong_drafts = wrong_drafts      # first prompt token -> positions drafted wrong
        self.calls: list[dict[str, list[int]]] = []
        self.problems: list[str] = []

    def forward(self, input_ids, position_ids, attention_mask, past_key_values, use_cache):
        tokens = input_ids.to(torch.float32)[:, None, :, None]
        keys, _ = past_key_values.update(tokens, tokens, 0)
        starts = position_ids[:, 0].tolist()
        self.calls.append({"starts": starts, "width": [input_ids.shape[1]]})
        self._check_cache(keys[:, 0, :, 0].long(), starts, input_ids, attention_mask)
        hidden = torch.zeros(*input_ids.shape, VOCAB)
        for row in range(input_ids.shape[0]):
            first = int(keys[row, 0, 0, 0])
            truth, bad = truth_for(first), self.wrong_drafts.get(first, set())
            for col in range(input_ids.shape[1]):
                target = int(position_ids[row, col]) + 1
                token = truth[target]
                if int(input_ids[row, col]) == MASK and target in bad:
                    token = wrong(token)
                hidden[row, col, token] = 10.0
        return SimpleNamespace(last_hidden_state=hidden)

    def _check_cache(self, keys, starts, input_ids, attention_mask):
        mask = attention_mask["full_attention"]
        if mask is None:   # allowed only when every row reads every slot: equal lengths
            mask = torch.ones(len(starts), 1, input_ids.shape[1], keys.shape[1], dtype=torch.bool)
            if len(set(starts)) != 1 or input_ids.shape[1] != 1:
                self.problems.append("no mask although rows differ in length")
        mask = mask[:, 0]
        for row, start in enumerate(starts):
            truth = truth_for(int(keys[row, 0]))
            if keys[row, :start].tolist() != truth[:start]:
                self.problems.append(f"row {row}: committed slots differ from the truth")
            if start and int(input_ids[row, 0]) != truth[start]:
                self.problems.append(f"row {row}: pending is not the next true token")
            expected = torch.arange(mask.shape[2])[None, :] <= start + torch.arange(
                mask.shape[1])[:, None]
            if not torch.equal(mask[row], expected):
                self.problems.append(f"row {row}: attention mask is not causal-from-{start}")


class ScriptedLM(nn.Module):
    def __init__(self, wrong_drafts: dict[int, set[int]]) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            num_hidden_layers=1, num_key_value_heads=1, num_attention_heads=1, head_dim=1,
            hidden_size=VOCAB, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=None,
            layer_types=["full_attention"])
        self.decoder = ScriptedDecoder(wrong_drafts)
        self.head = nn.Linear(VOCAB, VOCAB, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(VOCAB))

    def get_decoder(self) -> ScriptedDecoder:
        return self.decoder

    def get_output_embeddings(self) -> nn.Linear:
        return self.head


def run(model: ScriptedLM, prompts: list[list[int]], strides: list[int], max_new: int = 12,
        stop_token_ids: tuple[int, ...] = ()):
    engine = DecodingEngine(model, MASK, stop_token_ids=[])
    sampling = SamplingParams(max_new_tokens=max_new, stop_token_ids=stop_token_ids)
    requests = [GenerationRequest(p, "isd" if n > 1 else "ar", max(n, 2) if n > 1 else 1,
                                  sampling) for p, n in zip(prompts, strides, strict=True)]
    return engine.generate(requests)


def test_reject_then_cold_start_then_full_accept_exactly() -> None:
    """N=3, prompt of 3, the draft for position 7 wrong: C, V, R, C, V, V, ... by hand."""
    model = ScriptedLM({5: {7}})
    result = run(model, [truth_for(5)[:3]], [3], max_new=12)[0]
    assert result.token_ids == truth_for(5)[3:15]
    # Window starts (= committed KV length before each forward):
    # prefill 0 -> emits t3; V from 3 keeps pending+2 -> 6; R at k=0 keeps 1 -> 7;
    # C keeps 1 -> 8; V -> 11; V -> 14 (12 tokens reached: t3..t14).
    assert [call["starts"][0] for call in model.decoder.calls] == [0, 3, 6, 7, 8, 11]
    # The cold start after the rejection runs N = 3 wide: no row in the batch verifies.
    assert [call["width"][0] for call in model.decoder.calls] == [3 + 2, 5, 5, 3, 5, 5]
    stats = result.stats
    assert (stats.forwards, stats.tokens) == (6, 12)
    assert (stats.full_accept_rounds, stats.reject_rounds, stats.cold_start_rounds) == (3, 1, 2)
    assert stats.tried == [4, 3] and stats.accepted == [3, 3]
    assert stats.tokens_per_forward == 2.0
    assert model.decoder.problems == []


def test_reject_at_second_draft_keeps_one_draft() -> None:
    """N=4: the first verify round accepts s_1, rejects s_2: emit s_1 + replacement."""
    model = ScriptedLM({9: {6}})
    result = run(model, [truth_for(9)[:3]], [4], max_new=6)[0]
    # prefill emits t3 and drafts t4 t5 t6(wrong); verify at 3: s1, s2 pass, s3 fails
    # -> k=2: emit t4 t5 + replacement t6, keep pending+2 -> 6; cold start emits t7 -> 7;
    # V at 7 emits t8.. but the budget of 6 tokens ends the request at t8.
    assert result.token_ids == truth_for(9)[3:9]
    assert [call["starts"][0] for call in model.decoder.calls] == [0, 3, 6, 7]
    stats = result.stats
    assert (stats.full_accept_rounds, stats.reject_rounds, stats.cold_start_rounds) == (1, 1, 2)
    assert stats.tried == [2, 2, 2] and stats.accepted == [2, 2, 1]
    assert model.decoder.problems == []


def test_all_accept_emits_stride_tokens_per_round() -> None:
    model = ScriptedLM({})
    result = run(model, [truth_for(3)[:4]], [4], max_new=13)[0]
    assert result.token_ids == truth_for(3)[4:17]
    # 1 token from the prefill, then 4 per round: 1 + 3 * 4 = 13 tokens in 4 forwards.
    assert [call["starts"][0] for call in model.decoder.calls] == [0, 4, 8, 12]
    assert (result.stats.full_accept_rounds, result.stats.cold_start_rounds) == (3, 1)
    assert result.stats.tokens_per_forward == 13 / 4


def test_ragged_batch_rows_keep_their_own_pattern_and_stats() -> None:
    """Mixed prompt lengths, strides (AR, 2, 3, 4) and wrong drafts in one batch."""
    wrong_drafts = {2: {6, 11}, 4: {9}, 6: set(), 8: {5, 6, 7, 8, 9}, 10: {20}}
    prompts = [truth_for(2)[:2], truth_for(4)[:7], truth_for(6)[:1], truth_for(8)[:4],
               truth_for(10)[:5]]
    strides = [4, 3, 1, 2, 4]
    together = run(ScriptedLM(wrong_drafts), prompts, strides, max_new=15)
    for prompt, stride, result in zip(prompts, strides, together, strict=True):
        alone = run(ScriptedLM(wrong_drafts), [prompt], [stride], max_new=15)[0]
        assert result.token_ids == truth_for(prompt[0])[len(prompt):len(prompt) + 15]
        assert result.stats == alone.stats


def test_stop_token_inside_accepted_drafts_ends_the_request_there() -> None:
    truth = truth_for(3)
    stop = truth[9]
    result = run(ScriptedLM({}), [truth[:4]], [4], max_new=30, stop_token_ids=(stop,))[0]
    assert result.token_ids == truth[4:10] and result.finish_reason == "stop"


@pytest.mark.parametrize("max_new", [1, 2, 5])
def test_budget_cuts_a_round_short(max_new: int) -> None:
    result = run(ScriptedLM({}), [truth_for(7)[:3]], [4], max_new=max_new)[0]
    assert result.token_ids == truth_for(7)[3:3 + max_new] and result.finish_reason == "length"


def test_ragged_ar_batch() -> None:
    model = ScriptedLM({})
    prompts = [truth_for(2)[:2], truth_for(4)[:7], truth_for(6)[:1]]
    results = run(model, prompts, [1, 1, 1], max_new=9)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == truth_for(prompt[0])[len(prompt):len(prompt) + 9]
        assert result.stats.forwards == 9 and result.stats.tokens_per_forward == 1.0
    assert model.decoder.problems == []
