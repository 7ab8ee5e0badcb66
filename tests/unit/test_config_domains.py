"""Every config value has its domain (issue 15, item 1).

The schema is walked for every numeric field (nested sections, list items, dict values);
each must carry a bound, and hypothesis draws values outside it. ``idlm config check``
must then answer with one line naming the file, key, value and allowed range, exit 2
and never a traceback. Cross-field rules and every stage script are checked too.
"""

from __future__ import annotations

import io
import subprocess
import sys
import types
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import annotated_types as at
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from idlm import cli, config

REPO = Path(__file__).resolve().parents[2]
# Representative keys under dict-valued fields (the walker needs one concrete key).
DICT_KEYS = {"mix": "arithmetic", "eval_mix": "arithmetic", "stage_retries": "ic",
             "min_speedup": "isd", "quality_drop_overrides": "gsm8k", "endpoints": "ar",
             "overrides": "gsm8k"}
# Settings a new dict entry needs besides the value under test.
REQUIRED = {"evaluate.endpoints.ar.": ["++evaluate.endpoints.ar.url=http://localhost:1"]}
# List items are overridden at index 0 (every list in the active config has one).
LIST_INDEX = 0


def _bounds(annotation: Any) -> tuple[type, list[Any]] | None:
    """(int or float, [Gt/Ge/Lt/Le ...]) of a numeric annotation, or None if not numeric."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        found = _bounds(base)
        if found is None:
            return None
        limits = list(found[1])
        for extra in extras:
            limits += [m for m in getattr(extra, "metadata", [extra])
                       if isinstance(m, at.Gt | at.Ge | at.Lt | at.Le)]
        return found[0], limits
    if origin in (typing.Union, types.UnionType):
        numeric = [_bounds(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        numeric = [n for n in numeric if n is not None]
        return numeric[0] if numeric else None
    if annotation in (int, float):
        return annotation, []
    return None


def _numeric_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type, list]]:
    """(override key, int/float, limits) for every numeric field under ``model``."""
    found = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        limits = [m for m in field.metadata if isinstance(m, at.Gt | at.Ge | at.Lt | at.Le)]
        found += _walk(field.annotation, key, limits)
    return found


def _walk(annotation: Any, key: str, limits: list) -> list[tuple[str, type, list]]:
    numeric = _bounds(annotation)
    if numeric is not None:
        return [(key, numeric[0], numeric[1] + limits)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return [hit for arg in args if arg is not type(None) for hit in _walk(arg, key, limits)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _numeric_fields(annotation, f"{key}.")
    if origin in (list, tuple):
        return [hit for position, arg in enumerate(args) if arg is not Ellipsis
                for hit in _walk(arg, f"{key}.{position if origin is tuple else LIST_INDEX}", [])]
    if origin is dict:
        leaf = key.rsplit(".", 1)[-1]
        inner = f"{key}.{DICT_KEYS.get(leaf, 'x')}"
        if leaf == "min_speedup":  # a dict of dicts: arm -> concurrency -> speedup
            return _walk(typing.get_args(args[1])[1], f"{inner}.1", [])
        return _walk(args[1], inner, [])
    return []


FIELDS = _numeric_fields(config.Config)


def test_every_numeric_value_has_a_domain() -> None:
    unbounded = [key for key, _, limits in FIELDS if not limits]
    assert len(FIELDS) > 90, len(FIELDS)
    assert unbounded == []


def _outside(kind: type, limits: list) -> st.SearchStrategy:
    """Values just past and far past each bound (nan and inf for floats)."""
    choices = []
    for limit in limits:
        if isinstance(limit, at.Gt | at.Ge):
            edge = limit.gt if isinstance(limit, at.Gt) else limit.ge
            top = edge if isinstance(limit, at.Gt) else edge - (1 if kind is int else 1e-3)
            choices.append(st.integers(max_value=int(top)) if kind is int
                           else st.floats(max_value=top, allow_nan=False))
        else:
            edge = limit.lt if isinstance(limit, at.Lt) else limit.le
            bottom = edge if isinstance(limit, at.Lt) else edge + (1 if kind is int else 1e-3)
            choices.append(st.integers(min_value=int(bottom)) if kind is int
                           else st.floats(min_value=bottom, allow_nan=False))
    if kind is float:
        choices.append(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return st.one_of(choices)


def _override_text(value: float | int) -> str:
    """A number as an override writes it (Hydra's grammar: inf, -inf, nan, 1e+300)."""
    return repr(value)


def _check(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_out_of_domain_values_fail_in_one_line(data: st.DataObject) -> None:
    key, kind, limits = data.draw(st.sampled_from(FIELDS), label="field")
    value = data.draw(_outside(kind, limits), label="value")
    needed = [text for prefix, texts in REQUIRED.items() if key.startswith(prefix)
              for text in texts]
    # ++ sets a key whether or not it is there yet (a dict entry the config may not have).
    code, out, err = _check(["config", "check", *needed, f"++{key}={_override_text(value)}"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    # The file, the key, the allowed range and the value are named.
    assert f"params.yaml: key '{key}': " in err and "(got " in err
    assert any(word in err for word in ("greater than", "less than", "finite")), err


@pytest.mark.parametrize(("override", "expected"), [
    ("model.tiny.hidden_size=-3", "key 'model.tiny.hidden_size': input should be greater than 0"
                                  " (got -3)"),
    ("model.tiny.num_attention_heads=5", "key 'model.tiny.num_attention_heads': 5 does not "
                                         "divide hidden_size 192"),
    ("model.tiny.num_key_value_heads=3", "key 'model.tiny.num_key_value_heads': 3 does not "
                                         "divide num_attention_heads 4"),
    ("lora.rank=193", "key 'lora.rank': 193 exceeds model.tiny.hidden_size 192; allowed: 1..192"),
    ("verify.stride=5", "key 'verify.stride': 5 is not one of verify.strides [2, 3, 4]"),
    ("prepare.synthetic.mix={arithmetic: 0, multiple_choice: 0, code: 0, instruction: 0}",
     "key 'prepare.synthetic.mix': weights sum to 0"),
    ("ic.train.betas=[0.9, 1.0]", "key 'ic.train.betas.1': input should be less than 1"),
    ("+evaluate.endpoints.ar={url: gpu-node:30000}", "key 'evaluate.endpoints.ar.url'"),
    ("gate.prompt_file=no/such.jsonl", "key 'gate.prompt_file': file 'no/such.jsonl' not found"),
    ("ic.phases.7.stride=3", "override 'ic.phases.7.stride=3': key 'ic.phases.7.stride' does "
                             "not lead to a setting"),
    ("ic.train.lr=[", "override 'ic.train.lr=[': not a valid override"),
])
def test_cross_field_and_path_rules(override: str, expected: str) -> None:
    code, _, err = _check(["config", "check", override])
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_every_stride_takes_2_to_16() -> None:
    """The engine decodes any stride 2..16 (MAX_STRIDE); every stride setting allows it."""
    from idlm.decoding.requests import MAX_STRIDE

    keys = ["ic.phases.0.stride", "lora.stride", "verify.stride", "evaluate.stride",
            "export.stride", "gate.stride"]
    edge = [f"{key}={MAX_STRIDE}" for key in keys] + [f"verify.strides=[2, {MAX_STRIDE}]"]
    cfg = config.load_profile("tiny", edge)
    assert {cfg.lora.stride, cfg.verify.stride, cfg.gate.stride} == {MAX_STRIDE}
    for key in keys:
        with pytest.raises(config.ConfigError, match=f"key '{key}'"):
            config.load_profile("tiny", [f"{key}={MAX_STRIDE + 1}"])


def _below_the_floor(stage: str) -> str:
    """An override that puts the stage's first lower-bounded numeric key under its bound."""
    for key, kind, limits in FIELDS:
        floor = next((m for m in limits if isinstance(m, at.Gt | at.Ge)), None)
        if key.startswith(f"{stage}.") and floor is not None:
            edge = floor.gt if isinstance(floor, at.Gt) else floor.ge - 1
            return f"{key}={kind(edge)}"
    raise AssertionError(f"stage '{stage}' has no lower-bounded numeric setting to refuse")


@pytest.mark.parametrize("stage", config.pipeline_stages(REPO))
def test_every_stage_script_refuses_in_one_line(stage: str) -> None:
    """The stage scripts validate before heavy imports: one line, exit 2, in seconds."""
    override = _below_the_floor(stage)
    result = subprocess.run([sys.executable, f"stages/{stage}.py", override], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    key = override.split("=")[0]
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f"key '{key}'" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
