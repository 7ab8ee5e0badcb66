"""The in-process decoding engine (``idlm.decoding``) as a backend: AR, ISD or R-ISD.

R-ISD is ISD on a model carrying the gated LoRA; the engine sets the gate itself. So the
three systems of the evaluation are::

    engine_backend(model_dir, system="ar")                          # the AR base
    engine_backend(ic_model_dir, system="isd", stride=4)            # I-DLM (ISD)
    engine_backend(base_dir, adapter_dir, system="risd", stride=4)  # R-ISD
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from idlm.benchmarks.backends import Completion, Messages, render_prompt
from idlm.config.downstream import EvalSampling
from idlm.decoding import algorithms  # the registry (light: no torch)
from idlm.systems import System


class EngineBackend:
    """Renders each prompt with the tokenizer's chat template (thinking on or off) and
    decodes all of them in one ``DecodingEngine.generate`` call (it batches internally)."""

    def __init__(self, engine: Any, mode: Literal["ar", "isd"] = "isd", *, stride: int = 4,
                 thinking: bool = True, proposal: Literal["sample", "argmax"] = "sample",
                 tokenizer: Any = None, name: str | None = None,
                 weights: str | None = None) -> None:
        self.engine = engine
        self.weights = weights
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the engine has no tokenizer: pass tokenizer=...")
        self.mode, self.stride, self.thinking, self.proposal = mode, stride, thinking, proposal
        self.drafting = algorithms.for_mode(mode).drafts
        self.name = name or (engine.name if self.drafting else "ar")

    @property
    def identity(self) -> dict[str, Any]:
        # ``weights``: what was loaded, so a retrained model never resumes an old model's
        # sample log (the settings alone are the same before and after retraining).
        return {"mode": self.engine.name if self.drafting else "ar",
                "stride": self.stride if self.drafting else 1, "proposal": self.proposal,
                "weights": self.weights}

    def generate(self, prompts: Sequence[Messages], sampling: EvalSampling,
                 seeds: Sequence[int] | None = None, thinking: bool | None = None
                 ) -> list[Completion]:
        from idlm.decoding import GenerationRequest, SamplingParams

        seeds = list(seeds) if seeds is not None else [sampling.seed] * len(prompts)
        thinking = self.thinking if thinking is None else thinking
        texts = [render_prompt(self.tokenizer, messages, thinking) for messages in prompts]
        requests = []
        for text, seed in zip(texts, seeds, strict=True):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            params = SamplingParams(
                temperature=max(0.0, sampling.temperature), top_p=sampling.top_p,
                top_k=max(0, sampling.top_k), max_new_tokens=sampling.max_new_tokens,
                seed=seed % (1 << 62), proposal=self.proposal)
            stride = self.stride if self.drafting else 1
            requests.append(GenerationRequest(ids, self.mode, stride, params))
        results = {result.index: result for result in self.engine.generate(requests)}
        return [self._completion(results.get(index), text)
                for index, text in enumerate(texts)]

    def _completion(self, result: Any, prompt_text: str) -> Completion:
        if result is None or not result.ok:
            error = result.error if result is not None else "the engine returned no result"
            return Completion("", "error", prompt_text=prompt_text, error=error)
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        finish = "length" if result.finish_reason == "length" else "stop"
        return Completion(text, finish, prompt_text=prompt_text,
                          completion_tokens=len(result.token_ids), stats=result.stats.as_dict())


def engine_backend(model_dir: str | Path, adapter_dir: str | Path | None = None, *,
                   system: System = "isd", stride: int = 4, thinking: bool = True,
                   proposal: Literal["sample", "argmax"] = "sample", device: str = "cpu",
                   dtype: Any = None, max_batch_size: int = 64) -> EngineBackend:
    """Load a model folder (and, for ``risd``, its gated adapter) and wrap the engine."""
    from idlm.decoding.loading import load_engine
    from idlm.model.base_weights import weights_fingerprint

    engine = load_engine(model_dir, adapter_dir, mode=system, device=device, dtype=dtype,
                         max_batch_size=max_batch_size)
    weights = weights_fingerprint(model_dir)
    if adapter_dir is not None:
        weights += "+" + weights_fingerprint(adapter_dir)
    return EngineBackend(engine, algorithms.get(system).mode, stride=stride,
                         thinking=thinking, proposal=proposal, name=system, weights=weights)
