"""What a user reads after every training run: held-out AR *answer accuracy* per kind.

A loss can fall while answers stay wrong (a model that has not learned to copy numbers
from its prompt has a low loss on every other token). So after ``base`` and after every IC
phase the model answers prepare's held-out items greedily through the decoding engine,
and the tiny benchmarks' own scorers mark them: the same rules as ``evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Held-out kind -> the tiny benchmark that scores it (idlm.benchmarks.suite.tiny).
KIND_BENCHMARKS = {"arithmetic": "tiny_arithmetic", "multiple_choice": "tiny_multiple_choice",
                   "code": "tiny_code", "instruction": "tiny_instruction"}


@torch.no_grad()
def heldout_accuracy(model: torch.nn.Module, tokenizer: Any, mask_token_id: int,
                     pad_token_id: int, items_path: Path, per_kind: int,
                     max_new_tokens: int = 96) -> dict[str, float]:
    """``accuracy_<kind>`` for each held-out kind (AR greedy, first ``per_kind`` items),
    and ``accuracy_<kind>_<question type>`` for kinds whose items name a question type."""
    from idlm.benchmarks.backends import render_prompt
    from idlm.benchmarks.registry import get_benchmark
    from idlm.decoding.engine import DecodingEngine
    from idlm.decoding.requests import GenerationRequest, SamplingParams

    if per_kind <= 0 or not items_path.is_file():
        return {}
    was_training = model.training
    engine = DecodingEngine(model, mask_token_id, pad_token_id=pad_token_id,
                            tokenizer=tokenizer, max_batch_size=64)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    scores: dict[str, float] = {}
    for kind, name in KIND_BENCHMARKS.items():
        benchmark = get_benchmark(name)
        samples = benchmark.load(str(items_path), limit=per_kind)
        if not samples:
            continue
        prompts = [tokenizer(render_prompt(tokenizer, s.messages, False),
                             add_special_tokens=False)["input_ids"] for s in samples]
        results = engine.generate([GenerationRequest(ids, mode="ar", stride=1, sampling=sampling)
                                   for ids in prompts])
        # Decoded as evaluate's engine backend does (the stop token is not answer text).
        texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results]
        marks = [bool(benchmark.score(text, s).correct)
                 for text, s in zip(texts, samples, strict=True)]
        scores[f"accuracy_{kind}"] = sum(marks) / len(samples)
        scores.update(_by_question_type(kind, samples, marks))
    model.train(was_training)
    return scores


def _by_question_type(kind: str, samples: list[Any], marks: list[bool]) -> dict[str, float]:
    """``accuracy_<kind>_<question type>`` where the items name one (multiple choice:
    largest, smallest, even, odd, sum, difference): a kind's score can hide one type the
    model never learned (the tiny base answers 1-3 of 7 sums and differences, ~95% of the
    rest)."""
    by_type: dict[str, list[bool]] = {}
    for sample, mark in zip(samples, marks, strict=True):
        if "question_type" in sample.meta:
            by_type.setdefault(str(sample.meta["question_type"]), []).append(mark)
    return {f"accuracy_{kind}_{name}": sum(own) / len(own)
            for name, own in sorted(by_type.items())}
