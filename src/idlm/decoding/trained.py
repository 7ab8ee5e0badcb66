"""The pipeline's trained models and held-out prompts, as the stages that decode find them
(verify, evaluate, export): which folder holds which system, the held-out items of
``prepare`` and their chat rendering, and the device to decode on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from idlm.config import Config
from idlm.errors import StageError


def model_dirs(cfg: Config) -> dict[str, tuple[Path, Path | None]]:
    """(model folder, adapter folder) per system, checked before anything heavy loads."""
    from idlm.training.common import base_model_path, read_base_pin

    base = base_model_path(cfg, read_base_pin(cfg))
    systems = {"ar": (base, None), "isd": (cfg.out("ic", "model"), None),
               "risd": (base, cfg.out("lora", "adapter"))}
    for name, (model, adapter) in systems.items():
        for folder, stage in ((model, "ic" if name == "isd" else "base"), (adapter, "lora")):
            if folder is not None and not folder.exists():
                raise StageError(f"{folder} is missing: run `dvc repro {stage}` first")
    return systems


def held_out_items(cfg: Config, count: int) -> list[dict[str, Any]]:
    """The first ``count`` held-out items of ``prepare`` (cycled when there are fewer)."""
    from idlm.data.prepare import load_eval_items

    items = load_eval_items(cfg)
    if not items:
        raise StageError(f"{cfg.out('prepare', 'eval_items.jsonl')} is empty: rerun "
                         "`dvc repro prepare` with prepare.synthetic.eval_size > 0")
    return [items[i % len(items)] for i in range(count)]


def item_kinds(items: list[dict[str, Any]]) -> list[str]:
    """Each item's prompt kind; items from before kinds were recorded count as one kind."""
    return [str(item.get("kind") or "unknown") for item in items]


def render_chat(tokenizer: Any, items: list[dict[str, Any]], thinking: bool = True
                ) -> list[list[int]]:
    """Items as chat-template token ids (generation prompt on)."""
    from idlm.benchmarks.backends import render_prompt

    return [tokenizer(render_prompt(tokenizer, item["messages"], thinking),
                      add_special_tokens=False)["input_ids"] for item in items]


def chat_prompts(cfg: Config, tokenizer: Any, count: int, thinking: bool = True
                 ) -> list[list[int]]:
    """The first ``count`` held-out items as chat-template token ids (generation prompt on)."""
    return render_chat(tokenizer, held_out_items(cfg, count), thinking)


def inference_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
