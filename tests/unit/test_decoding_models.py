"""Tiny models for the decoding tests: random ones, and one IC-trained for a few seconds.

The trained model learns arithmetic-progression sequences (a step token, then x, x+s,
x+2s, ... mod 99 with 10% random jumps) with the IC objective at N=4, so its MASK rows
draft well but not perfectly: ISD runs see full accepts, rejections at every draft
position and cold starts, which is what the equality tests need to mean something.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.requests import GenerationRequest, SamplingParams
from idlm.decoding.stats import aggregate
from tests.conftest import MASK_ID, PAD_ID, tiny_qwen3

TRAIN_STEPS = 120


def pattern_sequences(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=generator))

    sequences = []
    for _ in range(count):
        step, value = draw(1, 4), draw(1, 100)
        sequence = [100 + step, value]
        for _ in range(length - 2):
            jump = float(torch.rand(1, generator=generator)) < 0.1
            value = draw(1, 100) if jump else (value + step - 1) % 99 + 1
            sequence.append(value)
        sequences.append(sequence)
    return sequences


def pattern_prompts(count: int, seed: int, min_length: int = 2, max_length: int = 9
                    ) -> list[list[int]]:
    """Ragged prompts: prefixes of fresh pattern sequences."""
    lengths = torch.randint(min_length, max_length + 1, (count,),
                            generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [s[:n] for s, n in zip(pattern_sequences(count, 24, seed), lengths, strict=True)]


@lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    from idlm.objective import build_ic_batch, ic_loss

    model = tiny_qwen3(seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(TRAIN_STEPS):
        sequences = pattern_sequences(32, 24, seed=1000 + step)
        offsets = torch.randint(0, 3, (32,), generator=generator).tolist()
        batch = build_ic_batch(sequences, [4] * 32, 4, MASK_ID, PAD_ID, offsets)
        loss = ic_loss(model, batch, 1.0).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return copy.deepcopy(model.state_dict())


def trained_ic_model() -> torch.nn.Module:
    """A fresh copy each call (callers may wrap it in an adapter); training runs once."""
    model = tiny_qwen3(seed=0)
    model.load_state_dict(_trained_state())
    return model.eval()


def test_trained_model_drafts_well_but_not_perfectly() -> None:
    engine = DecodingEngine(trained_ic_model(), MASK_ID, stop_token_ids=[])
    sampling = SamplingParams(max_new_tokens=24)
    results = engine.generate([GenerationRequest(p, "isd", 4, sampling)
                               for p in pattern_prompts(8, seed=3)])
    summary = aggregate(r.stats for r in results)
    assert summary["tokens_per_forward"] > 2.0
    assert summary["full_accept_rounds"] > 0 and summary["reject_rounds"] > 0
    assert all(0.5 < rate < 1.0 for rate in summary["acceptance"])
