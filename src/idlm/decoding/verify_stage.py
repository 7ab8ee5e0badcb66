"""The ``verify`` stage: lossless, exactness and acceptance checks on the trained models.

Three models are loaded through :func:`idlm.decoding.loading.load_engine`, exactly as
``idlm generate`` and the evaluation load them: the IC model (ISD), the base (AR reference)
and the base with the gated adapter (R-ISD). Prompts are the held-out items of ``prepare``
rendered with the chat template. Every check runs even when an earlier one fails; the
report and metrics are written first, then the stage fails (non-zero exit) if any gating
check failed, so DVC records nothing as done and the flow shows which check missed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from idlm.config import Config
from idlm.stage import StageError, write_json_atomic

REPORT, METRICS, PLOT = "report.json", "metrics.json", "acceptance.png"


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


def chat_prompts(cfg: Config, tokenizer: Any, count: int, thinking: bool = True
                 ) -> list[list[int]]:
    """The first ``count`` held-out items as chat-template token ids (generation prompt on)."""
    from idlm.benchmarks.backends import render_prompt
    from idlm.data.prepare import load_eval_items

    items = load_eval_items(cfg)
    if not items:
        raise StageError(f"{cfg.out('prepare', 'eval_items.jsonl')} is empty: rerun "
                         "`dvc repro prepare` with prepare.synthetic.eval_size > 0")
    chosen = [items[i % len(items)] for i in range(count)]
    return [tokenizer(render_prompt(tokenizer, item["messages"], thinking),
                      add_special_tokens=False)["input_ids"] for item in chosen]


def run(cfg: Config) -> dict[str, Any]:
    from idlm.decoding.loading import load_engine
    from idlm.decoding.verify import verify_all

    began = time.perf_counter()
    settings = cfg.verify
    systems = model_dirs(cfg)
    device = inference_device()
    engines = {name: load_engine(model, adapter, mode=name, device=device,
                                 dtype=cfg.model.dtype, mask_token_id=cfg.model.mask_token_id,
                                 max_batch_size=settings.max_batch_size)
               for name, (model, adapter) in systems.items()}
    reference = engines["ar"]
    if reference.tokenizer is None:
        raise StageError(f"{systems['ar'][0]} has no tokenizer: rerun `dvc repro base`")
    prompts = chat_prompts(cfg, reference.tokenizer, settings.prompts)
    exact = settings.exactness
    report = verify_all(
        engines["isd"].model, reference.model, engines["risd"].model, prompts,
        reference.mask_token_id, stride=settings.stride, strides=tuple(settings.strides),
        max_new_tokens=settings.max_new_tokens, stop_token_ids=reference.stop_token_ids,
        exactness_prompts=exact.prompts, samples=exact.samples,
        continuation=exact.continuation, temperature=exact.temperature, top_k=exact.top_k,
        top_p=exact.top_p, significance=exact.significance,
        max_batch_size=settings.max_batch_size,
        compare_transformers=settings.compare_transformers)
    report["seconds"] = round(time.perf_counter() - began, 1)
    report["device"] = device
    out = cfg.out("verify")
    write_json_atomic(out / REPORT, report)
    metrics = summary(report, settings.stride)
    write_json_atomic(out / METRICS, metrics)
    plot_acceptance(report, out / PLOT)
    if not report["passed"]:
        raise StageError(f"verify failed: {', '.join(report['failed_checks'])} "
                         f"(details in {out / REPORT})")
    return metrics


def summary(report: dict[str, Any], stride: int) -> dict[str, Any]:
    """The figures people compare across runs (the full report holds the rest)."""
    metrics: dict[str, Any] = {"passed": report["passed"],
                               "failed_checks": report["failed_checks"],
                               "seconds": report["seconds"]}
    for mode in ("isd", "risd"):
        lossless = report[f"lossless_{mode}"]
        metrics[f"lossless_{mode}"] = {"mismatches": lossless["mismatches"],
                                       "prompts": lossless["prompts"],
                                       "tokens_compared": lossless["tokens_compared"]}
        exact = report[f"exactness_{mode}"]
        metrics[f"exactness_{mode}"] = {"p_value": exact[mode]["p_value"] if mode in exact
                                        else exact["isd"]["p_value"],
                                        "ar_p_value": exact["ar"]["p_value"]}
        for key, sweep in report[f"acceptance_{mode}"]["strides"].items():
            decoding = sweep["decoding"]
            metrics[f"{mode}_n{key}"] = {
                "tokens_per_forward": decoding.get("tokens_per_forward"),
                "acceptance_per_position": decoding.get("acceptance"),
                "introspective_acceptance": _introspective(sweep)}
    metrics["tokens_per_forward"] = metrics[f"isd_n{stride}"]["tokens_per_forward"]
    metrics["introspective_acceptance"] = metrics[f"isd_n{stride}"]["introspective_acceptance"]
    metrics["risd_tokens_per_forward"] = metrics[f"risd_n{stride}"]["tokens_per_forward"]
    return metrics


def _introspective(sweep: dict[str, Any]) -> float | None:
    return (sweep.get("introspective_acceptance") or {}).get("mean")


def plot_acceptance(report: dict[str, Any], path: Path) -> Path:
    """Acceptance per draft position, one line per (mode, stride): where drafts fail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from idlm.plots import save_figure

    figure, axis = plt.subplots(figsize=(6, 4))
    for mode, style in (("isd", "-o"), ("risd", "--s")):
        for key, sweep in report[f"acceptance_{mode}"]["strides"].items():
            rates = [r if r is not None else float("nan")
                     for r in sweep["decoding"].get("acceptance") or []]
            tpf = sweep["decoding"].get("tokens_per_forward") or 0.0
            axis.plot(range(1, len(rates) + 1), rates, style,
                      label=f"{mode.upper()} N={key} (TPF {tpf:.2f})")
    longest = max((len(sweep["decoding"].get("acceptance") or [])
                   for mode in ("isd", "risd")
                   for sweep in report[f"acceptance_{mode}"]["strides"].values()), default=1)
    axis.set_xticks(range(1, longest + 1))
    axis.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1.02),
             title="Draft acceptance per position (greedy)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)


def inference_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
