"""Build a decoding engine from folders on disk: the model (with its tokenizer) and, for
R-ISD, the gated adapter. Every failure is one ``DecodingError`` line saying what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from idlm.decoding import algorithms
from idlm.decoding.engine import DecodingEngine
from idlm.decoding.requests import DecodingError

MODES = algorithms.systems()   # ar, isd, risd: the algorithms tied to a kind of model


def load_engine(model_dir: str | Path, adapter_dir: str | Path | None = None, mode: str = "isd",
                *, device: str = "cpu", dtype: Any = None, mask_token_id: int | None = None,
                max_batch_size: int = 64, allow_other_base: bool = False,
                compile: bool = False) -> DecodingEngine:
    """``mode`` risd needs ``adapter_dir`` (a gated LoRA trained on exactly these weights,
    unless ``allow_other_base``); ar/isd refuse one. ``compile``: ``torch.compile`` the
    decoder's dense maths (``idlm.decoding.compiled``)."""
    model_dir = Path(model_dir)
    if mode not in MODES:
        raise DecodingError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if not (model_dir / "config.json").is_file():
        raise DecodingError(f"{model_dir} is not a model folder (no config.json): train it "
                            "first or point at a folder saved by save_pretrained")
    gated = bool(algorithms.get(mode).gated)
    if gated and adapter_dir is None:
        raise DecodingError(f"mode {mode} needs an adapter: pass the gated LoRA folder")
    if not gated and adapter_dir is not None:
        raise DecodingError(f"an adapter is only used in mode {_gated_systems()} "
                            f"(got mode {mode})")
    if gated:
        _check_base(Path(adapter_dir), model_dir, allow_other_base)
    tokenizer = _tokenizer(model_dir)
    model = _model(model_dir, device, dtype)
    if gated:
        model = _with_adapter(model, Path(adapter_dir))
    mask = _mask_id(mask_token_id, tokenizer, model, model_dir)
    return DecodingEngine(model, mask, pad_token_id=_pad_id(tokenizer, model),
                          stop_token_ids=_stop_ids(tokenizer, model), tokenizer=tokenizer,
                          max_batch_size=max_batch_size, compile=compile)


def _gated_systems() -> str:
    return " or ".join(name for name in MODES if algorithms.get(name).gated)


def _tokenizer(model_dir: Path) -> Any:
    if not (model_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    from idlm.model.factory import rerun_hint

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # a damaged file raises json, tokenizers or OS errors
        raise DecodingError(f"{model_dir}: cannot load the tokenizer "
                            f"({type(error).__name__}); {rerun_hint(model_dir)}") from None


def _model(model_dir: Path, device: str, dtype: Any) -> Any:
    import torch

    from idlm.errors import StageError
    from idlm.model.factory import load_causal_lm

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, dtype)
    try:
        return load_causal_lm(model_dir, device=device, dtype=dtype, attention="sdpa")
    except StageError as error:  # a damaged weight file, already one line
        raise DecodingError(str(error)) from None
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DecodingError(f"cannot load the model in {model_dir}: {first_line}") from None


def _check_base(adapter_dir: Path, model_dir: Path, allow_other_base: bool) -> None:
    from idlm.model.base_weights import BaseWeightsError, check_adapter_base

    try:
        check_adapter_base(adapter_dir, model_dir, allow_other_base=allow_other_base)
    except BaseWeightsError as error:
        raise DecodingError(str(error)) from None


def _with_adapter(model: Any, adapter_dir: Path) -> Any:
    from idlm.model.adapter_files import load_gated_lora
    from idlm.model.gated_lora import GatedLoraError

    try:
        return load_gated_lora(model, adapter_dir).eval()
    except GatedLoraError as error:
        raise DecodingError(str(error)) from None


def _mask_id(explicit: int | None, tokenizer: Any, model: Any, model_dir: Path) -> int:
    for candidate in (explicit, getattr(tokenizer, "mask_token_id", None),
                      getattr(model.config, "mask_token_id", None)):
        if candidate is not None:
            return int(candidate)
    raise DecodingError(f"no MASK token id: {model_dir} has no tokenizer with a mask token "
                        "(the prepare stage registers one); pass mask_token_id")


def _pad_id(tokenizer: Any, model: Any) -> int | None:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(model.config, "pad_token_id", None)


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """The tokenizer's eos (``<|im_end|>`` for chat) and the model config's eos ids."""
    ids: list[int] = []
    configured = getattr(model.config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    for token_id in [getattr(tokenizer, "eos_token_id", None), *configured]:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids
