"""What evaluate adds to its config section: the tiny sets read prepare's held-out items.

The settings themselves are the config's (``idlm.config.downstream``: ``EvaluateSection``,
``EvalSampling``, ``EvalSandbox``, ``EvalOverride``); the library takes them as they are.
"""

from __future__ import annotations

from idlm.config.downstream import EvalOverride, EvaluateSection


def with_tiny_items(settings: EvaluateSection, eval_items_path: str) -> EvaluateSection:
    """Point every ``tiny_*`` benchmark without its own path at prepare's eval_items.jsonl."""
    overrides = dict(settings.overrides)
    for name in settings.benchmarks:
        if name.startswith("tiny_") and name != "tiny_humaneval":
            own = overrides.get(name, EvalOverride())
            if own.path is None:
                overrides[name] = own.model_copy(update={"path": eval_items_path})
    return settings.model_copy(update={"overrides": overrides})
