"""The ``verify`` stage: lossless, exactness and acceptance checks on the trained models.

Three models are loaded through :func:`idlm.decoding.loading.load_engine`, exactly as
``idlm generate`` and the evaluation load them: the IC model (ISD), the base (AR reference)
and the base with the gated adapter (R-ISD). Prompts are the held-out items of ``prepare``
rendered with the chat template; each keeps its ``kind`` so TPF and acceptance are also
reported per kind (which prompts the model drafts well). Every check runs even when an
earlier one fails; the report and metrics are written first, then the stage fails
(non-zero exit) if any gating check failed, so DVC records nothing as done and the flow
shows which check missed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from idlm.config import Config
from idlm.decoding.trained import (
    held_out_items,
    inference_device,
    item_kinds,
    model_dirs,
    render_chat,
)
from idlm.errors import StageError
from idlm.stage import write_json_atomic

REPORT, METRICS, PLOT = "report.json", "metrics.json", "acceptance.png"
MODES = ("isd", "risd")


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
    items = held_out_items(cfg, settings.prompts)
    prompts = render_chat(reference.tokenizer, items)
    exact = settings.exactness
    report = verify_all(
        engines["isd"].model, reference.model, engines["risd"].model, prompts,
        reference.mask_token_id, stride=settings.stride, strides=tuple(settings.strides),
        max_new_tokens=settings.max_new_tokens, stop_token_ids=reference.stop_token_ids,
        exactness_prompts=exact.prompts, samples=exact.samples,
        continuation=exact.continuation, temperature=exact.temperature, top_k=exact.top_k,
        top_p=exact.top_p, significance=exact.significance,
        max_batch_size=settings.max_batch_size, exactness_batch_size=exact.max_batch_size,
        compare_transformers=settings.compare_transformers, kinds=item_kinds(items))
    report["seconds"] = round(time.perf_counter() - began, 1)
    report["device"] = device
    out = cfg.out("verify")
    write_json_atomic(out / REPORT, report)
    metrics = summary(report, settings.stride)
    write_json_atomic(out / METRICS, metrics)
    plot_acceptance(report, out / PLOT, settings.stride)
    if not report["passed"]:
        raise StageError(f"verify failed: {', '.join(report['failed_checks'])} "
                         f"(details in {out / REPORT})")
    return metrics


def summary(report: dict[str, Any], stride: int) -> dict[str, Any]:
    """The figures people compare across runs (the full report holds the rest)."""
    metrics: dict[str, Any] = {"passed": report["passed"],
                               "failed_checks": report["failed_checks"],
                               "seconds": report["seconds"]}
    for mode in MODES:
        metrics.update(_check_metrics(report, mode))
        for key, sweep in report[f"acceptance_{mode}"]["strides"].items():
            metrics[f"{mode}_n{key}"] = _stride_metrics(sweep)
    metrics["tokens_per_forward"] = metrics[f"isd_n{stride}"]["tokens_per_forward"]
    metrics["introspective_acceptance"] = metrics[f"isd_n{stride}"]["introspective_acceptance"]
    metrics["risd_tokens_per_forward"] = metrics[f"risd_n{stride}"]["tokens_per_forward"]
    metrics.update(_serving_metrics(report, stride))
    return metrics


def _check_metrics(report: dict[str, Any], mode: str) -> dict[str, Any]:
    lossless = report[f"lossless_{mode}"]
    metrics = {f"lossless_{mode}": {"mismatches": lossless["mismatches"],
                                    "near_ties": lossless.get("near_ties", 0),
                                    "prompts": lossless["prompts"],
                                    "tokens_compared": lossless["tokens_compared"]}}
    names = [f"exactness_{mode}"] + (["exactness_isd_argmax_proposal"] if mode == "isd" else [])
    for name in names:
        if name in report:
            metrics[name] = _exactness_metrics(report[name])
    return metrics


def _exactness_metrics(exact: dict[str, Any]) -> dict[str, Any]:
    """Joint and worst per-position p-values of the speculative sampler, AR's as calibration."""
    return {"p_value": exact["isd"]["p_value"],
            "min_position_p_value": exact["isd"].get("min_position_p_value"),
            "steady_state_rounds": exact["isd"].get("steady_state_rounds"),
            "ar_p_value": exact["ar"]["p_value"],
            "ar_min_position_p_value": exact["ar"].get("min_position_p_value")}


def _stride_metrics(sweep: dict[str, Any]) -> dict[str, Any]:
    decoding, formula = sweep["decoding"], sweep.get("formula") or {}
    return {"tokens_per_forward": decoding.get("tokens_per_forward"),
            "acceptance_per_position": decoding.get("acceptance"),
            "introspective_acceptance": _introspective(sweep),
            "tokens_per_forward_formula": formula.get("tokens_per_forward"),
            "measured_over_formula": formula.get("measured_over_formula"),
            "tokens_per_forward_by_kind": {kind: figures["tokens_per_forward"] for kind, figures
                                           in (sweep.get("by_kind") or {}).items()}}


def _serving_metrics(report: dict[str, Any], stride: int) -> dict[str, Any]:
    """Flat keys at the serving stride (``tpf_n4_code``): DVC's metric diff shows them as is."""
    flat: dict[str, Any] = {}
    for mode in MODES:
        prefix = "" if mode == "isd" else f"{mode}_"
        sweep = report[f"acceptance_{mode}"]["strides"][str(stride)]
        formula = sweep.get("formula") or {}
        flat[f"{prefix}tpf_formula_n{stride}"] = formula.get("tokens_per_forward")
        flat[f"{prefix}tpf_over_formula_n{stride}"] = formula.get("measured_over_formula")
        for kind, figures in (sweep.get("by_kind") or {}).items():
            flat[f"{prefix}tpf_n{stride}_{kind}"] = figures["tokens_per_forward"]
    return flat


def _introspective(sweep: dict[str, Any]) -> float | None:
    return (sweep.get("introspective_acceptance") or {}).get("mean")


def _rates(figures: dict[str, Any]) -> list[float]:
    return [r if r is not None else float("nan") for r in figures.get("acceptance") or []]


def plot_acceptance(report: dict[str, Any], path: Path, stride: int | None = None) -> Path:
    """Acceptance per draft position, one line per (mode, stride): where drafts fail.

    With ``stride`` and per-kind figures, a second panel shows that stride per prompt kind
    (ISD solid, R-ISD dashed, one colour per kind): which prompts the model drafts well.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from idlm.plots import save_figure

    by_kind = stride is not None and any(
        report[f"acceptance_{mode}"]["strides"].get(str(stride), {}).get("by_kind")
        for mode in MODES)
    panels = 2 if by_kind else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    _plot_strides(axes[0][0], report)
    if by_kind:
        _plot_kinds(axes[0][1], report, stride)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)


def _plot_strides(axis: Any, report: dict[str, Any]) -> None:
    longest = 1
    for mode, style in zip(MODES, ("-o", "--s"), strict=True):
        for key, sweep in report[f"acceptance_{mode}"]["strides"].items():
            rates = _rates(sweep["decoding"])
            tpf = sweep["decoding"].get("tokens_per_forward") or 0.0
            axis.plot(range(1, len(rates) + 1), rates, style,
                      label=f"{mode.upper()} N={key} (TPF {tpf:.2f})")
            longest = max(longest, len(rates))
    _style(axis, longest, "Draft acceptance per position (greedy)")


def _plot_kinds(axis: Any, report: dict[str, Any], stride: int) -> None:
    import matplotlib.pyplot as plt

    sweeps = {mode: report[f"acceptance_{mode}"]["strides"].get(str(stride), {})
              for mode in MODES}
    kinds = sorted({kind for sweep in sweeps.values() for kind in sweep.get("by_kind") or {}})
    colours = plt.get_cmap("tab10")
    for mode, style in zip(MODES, ("-o", "--s"), strict=True):
        for index, kind in enumerate(kinds):
            figures = (sweeps[mode].get("by_kind") or {}).get(kind)
            if figures is None:
                continue
            rates = _rates(figures)
            axis.plot(range(1, len(rates) + 1), rates, style, color=colours(index % 10),
                      label=f"{mode.upper()} {kind} (TPF {figures['tokens_per_forward']:.2f},"
                            f" n={figures['prompts']})")
    _style(axis, stride - 1, f"Per prompt kind at N={stride}")


def _style(axis: Any, positions: int, title: str) -> None:
    axis.set_xticks(range(1, positions + 1))
    axis.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1.02), title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


