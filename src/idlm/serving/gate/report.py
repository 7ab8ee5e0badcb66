"""What the ``gate`` stage writes for people and for DVC/MLflow: the markdown report, the
throughput-latency PNG and the flat metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idlm.plots import save_figure
from idlm.serving.gate.decision import BASELINE, Decision, misses_table, paired_ratios

ARM_TITLES = {"ar": "AR base", "isd": "I-DLM (ISD)", "risd": "R-ISD"}


def _by_level(per_arm: Mapping[Any, Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    return sorted((int(level), figures) for level, figures in per_arm.items())


def metrics(measurements: Mapping[str, Mapping[Any, Mapping[str, Any]]], decision: Decision,
            seconds: float) -> dict[str, Any]:
    """DVC-style nested metrics: verdict, speedups, figures per arm and level (``c<C>``)."""
    figures: dict[str, Any] = {}
    for name in ("per_request_tok_s", "output_tok_s", "ttft_p50_ms", "tpot_p50_ms"):
        figures[name] = {arm: {f"c{level}": round(values[name], 3)
                               for level, values in _by_level(per_arm)}
                         for arm, per_arm in measurements.items()}
    return {"passed": decision.passed, "misses": len(decision.misses),
            "speedup": {arm: {f"c{level}": round(ratio, 4) for level, ratio in levels.items()}
                        for arm, levels in decision.speedups.items()},
            "quality_delta": decision.quality_deltas, **figures,
            "errors": {arm: sum(int(v.get("errored", 0)) for v in per_arm.values())
                       for arm, per_arm in measurements.items()},
            "seconds": round(seconds, 1)}


def markdown(measurements: Mapping[str, Mapping[Any, Mapping[str, Any]]], decision: Decision,
             setup: Mapping[str, Any], promoted: list[dict[str, Any]]) -> str:
    verdict = "PASS" if decision.passed else "FAIL"
    turns = ", the arms in turn at each level" if setup.get("interleaved") else ""
    lines = [f"# Gate: {verdict}", "",
             f"Load: guidellm {setup.get('guidellm', '?')}, concurrent streams "
             f"{setup.get('concurrencies', '?')}, {setup.get('repeats', '?')} repeats "
             f"(medians{turns}), {setup.get('output_tokens', '?')} output tokens per request, "
             f"stride N={setup.get('stride', '?')}, prompts: {setup.get('prompts', '?')}.", "",
             "| arm | C | per-request tok/s | speedup | output tok/s | TTFT p50/p99 ms "
             "| TPOT p50/p99 ms | ok / errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, per_arm in measurements.items():
        for level, v in _by_level(per_arm):
            ratio = decision.speedups.get(arm, {}).get(level)
            shown = "1.00x (base)" if arm == BASELINE else (
                f"{ratio:.2f}x" if ratio is not None else "–")
            lines.append(
                f"| {ARM_TITLES.get(arm, arm)} | {level} | {v['per_request_tok_s']:.1f} | "
                f"{shown} | {v['output_tok_s']:.1f} | {v['ttft_p50_ms']:.0f} / "
                f"{v['ttft_p99_ms']:.0f} | {v['tpot_p50_ms']:.1f} / {v['tpot_p99_ms']:.1f} | "
                f"{v['successful']} / {v['errored']} |")
    lines += _repeat_ratios(measurements)
    decoding = setup.get("decoding") or {}
    if decoding:
        per_arm = ", ".join(f"{ARM_TITLES.get(arm, arm)} {stats['tokens_per_forward']:.2f}"
                            for arm, stats in decoding.items())
        lines += ["", "Tokens per forward on the server (all requests, warm-up included): "
                  + per_arm + "."]
    lines += ["", "Quality against the AR base (points; from evaluate):", ""]
    for arm, deltas in decision.quality_deltas.items():
        shown = ", ".join(f"{bench} {delta:+.1f}" for bench, delta in deltas.items()) or "–"
        lines.append(f"- {ARM_TITLES.get(arm, arm)}: {shown}")
    if decision.misses:
        lines += ["", "What missed:", "", misses_table(decision.misses)]
    if promoted:
        lines += ["", "Promoted: " + ", ".join(
            f"{p['name']} v{p['version']} -> '{p['alias']}'" for p in promoted)]
    else:
        lines += ["", "Registry alias untouched."]
    return "\n".join(lines) + "\n"


def _repeat_ratios(measurements: Mapping[str, Mapping[Any, Mapping[str, Any]]]) -> list[str]:
    """Lines of each arm's per-repeat tok/s over AR's in the same repeat (the speedup is
    their median), so the spread a verdict rests on is on the page."""
    base = {int(level): v for level, v in measurements.get(BASELINE, {}).items()}
    lines = []
    for arm, per_arm in measurements.items():
        if arm == BASELINE:
            continue
        cells = []
        for level, v in _by_level(per_arm):
            ratios = paired_ratios(v, base.get(level, {}))
            if ratios:
                cells.append(f"C={level} " + " / ".join(f"{r:.2f}" for r in ratios))
        if cells:
            lines.append(f"- {ARM_TITLES.get(arm, arm)}: " + "; ".join(cells))
    return ["", "Speedup in each repeat (the table gives their median):", "", *lines] \
        if lines else []


def plot(measurements: Mapping[str, Mapping[Any, Mapping[str, Any]]], out_path: Path,
         title: str) -> Path:
    """Left: per-request tok/s against concurrency. Right: throughput-latency (server output
    tok/s against TPOT p50), one line per arm, points labelled with C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, per_arm in measurements.items():
        levels = _by_level(per_arm)
        label = ARM_TITLES.get(arm, arm)
        concurrency = [level for level, _ in levels]
        left.plot(concurrency, [v["per_request_tok_s"] for _, v in levels], marker="o",
                  label=label)
        throughput = [v["output_tok_s"] for _, v in levels]
        latency = [v["tpot_p50_ms"] for _, v in levels]
        right.plot(throughput, latency, marker="o", label=label)
        for level, x, y in zip(concurrency, throughput, latency, strict=True):
            right.annotate(f"C={level}", (x, y), textcoords="offset points", xytext=(4, 4),
                           fontsize=7)
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrency")
    left.set_ylabel("per-request output tok/s (median)")
    right.set_xlabel("server output tok/s")
    right.set_ylabel("TPOT p50 (ms)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=120)
