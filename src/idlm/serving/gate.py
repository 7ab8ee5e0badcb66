"""The ``gate`` stage: load-test I-DLM (ISD) and R-ISD against the AR base, add the quality
deltas from ``evaluate``, and promote the exported bundles only if every check passes.

Method. Each arm is served by the same engine with the same flags (``idlm serve --mode
ar|isd|risd`` on a free port, or an external SGLang URL per arm) and loaded by guidellm
(``loadtest``) at each concurrency level, ``repeats`` times, interleaved; the gate takes the
median over repeats. Per arm and level it records per-request tok/s, server output tok/s,
TTFT and TPOT p50/p99 and errors.

Why per-request tok/s is the gated figure: it is the paper's (I-DLM-8B vs Qwen3-8B on one
H100: 326 vs 142 tok/s at C=1, 2.30x; 125 vs 93 at C=64, 1.34x). It is what one user
sees, and it is where a decoding method that commits several tokens per forward must
show its gain; server output tok/s at high concurrency mostly measures how well the
batch fills the accelerator, which AR does well too. Output tok/s is reported beside it.

Decision (``decide``, pure): pass iff every gated arm has measurements, reaches
``min_speedup[arm][C]`` for every listed level, stays within ``max_error_rate`` at every
level, and loses at most ``max_quality_drop`` points against AR on every benchmark the
AR base was scored on. Pass: the registry alias (``champion``) moves to this export's
registered versions. Fail: ``StageError`` with the table of what missed; alias untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from idlm.stage import StageError

LOG = logging.getLogger("idlm.gate")
BASELINE = "ar"


@dataclass(frozen=True)
class Thresholds:
    """What an arm must reach; built from the config's ``gate`` section."""

    min_speedup: Mapping[str, Mapping[int, float]]
    max_error_rate: float = 0.0
    max_quality_drop: float = 5.0
    quality_drop_overrides: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, gate: Any) -> Thresholds:
        return cls(min_speedup={arm: dict(levels) for arm, levels in gate.min_speedup.items()},
                   max_error_rate=gate.max_error_rate, max_quality_drop=gate.max_quality_drop,
                   quality_drop_overrides=dict(gate.quality_drop_overrides))

    def allowed_drop(self, benchmark: str) -> float:
        return self.quality_drop_overrides.get(benchmark, self.max_quality_drop)


@dataclass(frozen=True)
class Miss:
    """One check that failed: which, for which arm, where (level or benchmark), how far."""

    check: str
    arm: str
    where: str
    measured: str
    required: str


@dataclass(frozen=True)
class Decision:
    passed: bool
    misses: list[Miss]
    speedups: dict[str, dict[int, float]]
    quality_deltas: dict[str, dict[str, float]]


# ------------------------------------------------------------------ pure parts
def _levels(per_arm: Mapping[Any, Any]) -> dict[int, dict[str, Any]]:
    """Concurrency keys as ints (a report read back from JSON has them as strings)."""
    return {int(level): dict(figures) for level, figures in per_arm.items()}


def speedups(measurements: Mapping[str, Mapping[Any, Any]]) -> dict[str, dict[int, float]]:
    """Per-request tok/s of each arm over AR's at the same level (levels both measured)."""
    if BASELINE not in measurements:
        return {}
    base = _levels(measurements[BASELINE])
    result: dict[str, dict[int, float]] = {}
    for arm, per_arm in measurements.items():
        if arm == BASELINE:
            continue
        result[arm] = {level: figures["per_request_tok_s"] / base[level]["per_request_tok_s"]
                       for level, figures in sorted(_levels(per_arm).items())
                       if level in base and base[level]["per_request_tok_s"] > 0}
    return result


def quality_deltas(scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Score of each system minus AR's, per benchmark both were scored on (points)."""
    base = scores.get(BASELINE, {})
    return {system: {bench: round(own[bench] - base[bench], 4)
                     for bench in sorted(base) if bench in own}
            for system, own in scores.items() if system != BASELINE}


def decide(measurements: Mapping[str, Mapping[Any, Any]], thresholds: Thresholds,
           scores: Mapping[str, Mapping[str, float]] | None,
           arms: tuple[str, ...] = ("isd", "risd")) -> Decision:
    """Pass/fail from recorded measurements, thresholds and evaluate's scores (pure).

    ``arms`` are the candidate arms gated against AR; an arm with a speedup threshold is
    gated even when it is not listed. A missing arm, level or score is a miss, never a pass.
    """
    gated = tuple(dict.fromkeys([*arms, *thresholds.min_speedup]))
    misses: list[Miss] = []
    if BASELINE not in measurements:
        misses.append(Miss("load test", BASELINE, "-", "no measurements",
                           "the AR baseline measured at every level"))
    ratios = speedups(measurements)
    for arm in gated:
        if arm not in measurements:
            misses.append(Miss("load test", arm, "-", "no measurements",
                               f"arm '{arm}' served and measured (gate.arms)"))
            continue
        misses += _speedup_misses(arm, ratios.get(arm, {}), thresholds,
                                  measured_levels=set(_levels(measurements[arm])))
    for arm in [BASELINE, *gated]:
        if arm in measurements:
            misses += _error_misses(arm, _levels(measurements[arm]), thresholds.max_error_rate)
    deltas = quality_deltas(scores or {})
    misses += _quality_misses(scores or {}, deltas, gated, thresholds)
    return Decision(passed=not misses, misses=misses, speedups=ratios, quality_deltas=deltas)


def _speedup_misses(arm: str, ratios: Mapping[int, float], thresholds: Thresholds,
                    measured_levels: set[int]) -> list[Miss]:
    misses = []
    for level, required in sorted(thresholds.min_speedup.get(arm, {}).items()):
        ratio = ratios.get(level)
        if ratio is None:
            why = "not measured" if level not in measured_levels else "no AR baseline"
            misses.append(Miss("speedup", arm, f"C={level}", why, f">= {required:.2f}x"))
        elif round(ratio, 2) < required:   # at the precision thresholds are written in
            misses.append(Miss("speedup", arm, f"C={level}", f"{ratio:.2f}x",
                               f">= {required:.2f}x"))
    return misses


def _error_misses(arm: str, levels: Mapping[int, Mapping[str, Any]],
                  max_error_rate: float) -> list[Miss]:
    misses = []
    for level, figures in sorted(levels.items()):
        total = figures.get("successful", 0) + figures.get("errored", 0)
        if figures.get("successful", 0) == 0:
            misses.append(Miss("errors", arm, f"C={level}", "no successful request",
                               "requests complete"))
        elif figures.get("errored", 0) / total > max_error_rate:
            misses.append(Miss("errors", arm, f"C={level}",
                               f"{figures['errored']}/{total} errored",
                               f"error rate <= {max_error_rate:.0%}"))
    return misses


def _quality_misses(scores: Mapping[str, Mapping[str, float]],
                    deltas: Mapping[str, Mapping[str, float]], gated: tuple[str, ...],
                    thresholds: Thresholds) -> list[Miss]:
    if not scores.get(BASELINE):
        return [Miss("quality", BASELINE, "-", "no scores",
                     "evaluate scores for the AR base (outputs/evaluate/scores.json)")]
    misses = []
    for arm in gated:
        if not scores.get(arm):
            misses.append(Miss("quality", arm, "-", "no scores",
                               f"evaluate scores for '{arm}' (evaluate.systems)"))
            continue
        for bench in sorted(scores[BASELINE]):
            delta = deltas.get(arm, {}).get(bench)
            allowed = thresholds.allowed_drop(bench)
            if delta is None:
                misses.append(Miss("quality", arm, bench, "not scored",
                                   f"scored like the AR base (drop <= {allowed:g})"))
            elif delta < -allowed:
                misses.append(Miss("quality", arm, bench, f"{delta:+.2f} points",
                                   f">= -{allowed:g} points"))
    return misses


def misses_table(misses: list[Miss]) -> str:
    lines = ["| check | arm | where | measured | required |", "|---|---|---|---|---|"]
    lines += [f"| {m.check} | {m.arm} | {m.where} | {m.measured} | {m.required} |"
              for m in misses]
    return "\n".join(lines)


# ------------------------------------------------------------------ inputs
def read_scores(path: Path) -> dict[str, dict[str, float]]:
    """``{system: {benchmark: score}}`` from evaluate's file, whatever wrapper it uses:
    ``{"systems": ...}``, ``{"scores": ...}`` or the mapping itself; a benchmark's entry may
    be a number or a dict with a ``score`` (or ``accuracy``) field. Missing file: ``{}``."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StageError(f"{path} is not valid JSON ({error}): rerun the evaluate stage") from None
    for key in ("systems", "scores"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    scores: dict[str, dict[str, float]] = {}
    for system, per_bench in (data.items() if isinstance(data, dict) else []):
        if not isinstance(per_bench, dict):
            continue
        for bench, value in per_bench.items():
            number = _score_value(value)
            if number is not None:
                scores.setdefault(system, {})[bench] = number
    return scores


def _score_value(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("score", value.get("accuracy"))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def decision_record(decision: Decision) -> dict[str, Any]:
    """JSON-ready: concurrency keys as strings, misses as dicts."""
    return {"passed": decision.passed, "misses": [asdict(m) for m in decision.misses],
            "speedups": {arm: {str(c): round(v, 4) for c, v in levels.items()}
                         for arm, levels in decision.speedups.items()},
            "quality_deltas": decision.quality_deltas}


# ------------------------------------------------------------------ the stage
@dataclass(frozen=True)
class ArmTarget:
    """One arm: an external server (``url``) or an ``idlm serve`` to start."""

    name: str
    url: str | None = None
    model: Path | None = None
    adapter: Path | None = None


def arm_targets(cfg: Any) -> list[ArmTarget]:
    """The configured arms, AR first, with the folders verify and evaluate use (ar: the
    pinned base, isd: the IC model, risd: base + gated LoRA) unless the arm names its own;
    checked before anything is started."""
    from idlm.config import resolve_path

    targets = []
    for name in sorted(cfg.gate.arms, key=lambda arm: (arm != BASELINE, arm)):
        arm = cfg.gate.arms[name]
        if arm.url:
            targets.append(ArmTarget(name, url=arm.url.rstrip("/")))
            continue
        model = resolve_path(arm.model) if arm.model else _default_model(cfg, name)
        adapter = None
        if name == "risd":
            adapter = resolve_path(arm.adapter) if arm.adapter else cfg.out("lora", "adapter")
        if not (model / "config.json").is_file():
            raise StageError(f"gate: arm '{name}' needs a model folder at {model} (no "
                             f"config.json): run the stages before gate or set "
                             f"gate.arms.{name}.model")
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise StageError(f"gate: arm '{name}' needs the gated LoRA at {adapter}: run the "
                             f"lora stage or set gate.arms.{name}.adapter")
        targets.append(ArmTarget(name, model=model, adapter=adapter))
    return targets


def _default_model(cfg: Any, arm: str) -> Path:
    from idlm.training.common import base_model_path, read_base_pin

    if arm == "isd":
        return cfg.out("ic", "model")
    return base_model_path(cfg, read_base_pin(cfg))


def load_plan(cfg: Any, targets: list[ArmTarget]) -> Any:
    """The guidellm plan shared by every arm: levels, counts, prompts, tokenizer."""
    from idlm.config import resolve_path
    from idlm.serving.loadtest import LoadPlan

    gate = cfg.gate
    base = next(t for t in targets if t.name == BASELINE)
    if gate.tokenizer:
        tokenizer = str(resolve_path(gate.tokenizer)) if resolve_path(gate.tokenizer).exists() \
            else gate.tokenizer
    elif base.model is not None:
        tokenizer = str(base.model)
    else:
        raise StageError("gate: the AR arm is an external server, so set gate.tokenizer (a "
                         "tokenizer folder or cached hub id) for counting tokens")
    prompts = read_prompts(resolve_path(gate.prompt_file)) if gate.prompt_file else ()
    return LoadPlan(concurrencies=tuple(gate.concurrencies), repeats=gate.repeats,
                    min_requests=gate.min_requests,
                    requests_per_stream=gate.requests_per_stream,
                    output_tokens=gate.output_tokens, tokenizer=tokenizer, prompts=prompts,
                    prompt_tokens=gate.prompt_tokens, request_format=gate.request_format,
                    temperature=gate.temperature,
                    max_seconds_per_level=gate.max_seconds_per_level,
                    generator_workers=gate.generator_workers, seed=cfg.seed)


def read_prompts(path: Path) -> tuple[str, ...]:
    """The ``prompt`` field of every row of a JSONL file."""
    if not path.is_file():
        raise StageError(f"gate.prompt_file {path} not found: run prepare, or unset it to "
                         "load with synthetic prompts")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = tuple(row["prompt"] for row in rows if isinstance(row.get("prompt"), str))
    if not prompts:
        raise StageError(f"gate.prompt_file {path} has no rows with a 'prompt' string")
    return prompts


def measure_arm(target: ArmTarget, plan: Any, gate: Any,
                workdir: Path) -> tuple[dict[int, Any], dict[str, Any] | None]:
    """Serve (or reach) one arm, warm it up, load it with guidellm: the summary per level
    and the server's decoding statistics (TPF, acceptance) where it reports them."""
    from idlm.serving import loadtest

    LOG.info("gate: measuring arm %s", target.name)
    if target.url is not None:
        loadtest.wait_until_ready(target.url, gate.startup_timeout_s)
        return _load(target.url, plan, workdir)
    port = loadtest.free_port()
    command = loadtest.serve_command(target.model, target.name, gate.stride, port,
                                     target.adapter, gate.server_args)
    with loadtest.idlm_server(command, port, workdir / "server.log", gate.startup_timeout_s,
                              threads=gate.server_threads) as url:
        return _load(url, plan, workdir)


def _load(url: str, plan: Any, workdir: Path) -> tuple[dict[int, Any], dict[str, Any] | None]:
    from idlm.serving import loadtest

    loadtest.warm_up(url, plan)
    levels = loadtest.summarise(loadtest.run_guidellm(plan, url, workdir))
    return levels, loadtest.decoding_stats(url)


# What the export stage leaves for the gate (under the outputs folder):
# {"registered": [{"name": "<registered model>", "version": "<n>"}, ...]}
EXPORT_REGISTRY = ("export", "registry.json")


def read_registered(path: Path) -> list[dict[str, str]]:
    """``[{"name", "version"}]``: the registry versions the export stage recorded (a list
    under ``registered``, a bare list, or a mapping bundle -> entry; ``registered_model``
    is taken for ``name``)."""
    if not path.is_file():
        raise StageError(f"gate: {path} not found: run the export stage first (it registers "
                         "the bundles the gate promotes)")
    data = json.loads(path.read_text())
    entries = data.get("registered", data) if isinstance(data, dict) else data
    if isinstance(entries, dict):
        entries = list(entries.values())
    found = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("registered_model")
        if name and entry.get("version") is not None:
            found.append({"name": str(name), "version": str(entry["version"])})
    if not found:
        raise StageError(f"gate: {path} names no registered model version (name + version): "
                         "rerun the export stage")
    return found


def promote(registered: list[dict[str, str]], alias: str,
            workspace: Path | None = None) -> list[dict[str, Any]]:
    """Point ``alias`` at each registered version (only called when the gate passed)."""
    from idlm import tracking

    promoted = []
    for entry in registered:
        tracking.set_alias(entry["name"], alias, entry["version"], workspace=workspace)
        promoted.append({**entry, "alias": alias})
    return promoted


def run(cfg: Any) -> dict[str, Any]:
    """The ``gate`` stage: check inputs, measure every arm, then ``conclude``."""
    import time

    from idlm.stage import atomic_dir

    began = time.perf_counter()
    targets = arm_targets(cfg)
    registered = read_registered(cfg.out(*EXPORT_REGISTRY))
    scores = read_scores(cfg.out("evaluate", "scores.json"))
    plan = load_plan(cfg, targets)
    with atomic_dir(cfg.out("gate", "loadtest")) as workdir:
        measured = {t.name: measure_arm(t, plan, cfg.gate, workdir / t.name) for t in targets}
    setup = {**_setup(cfg, plan, targets),
             "decoding": {arm: stats for arm, (_, stats) in measured.items() if stats}}
    return conclude(cfg, {arm: levels for arm, (levels, _) in measured.items()}, scores,
                    registered, setup, seconds=time.perf_counter() - began)


def conclude(cfg: Any, measurements: dict[str, dict[Any, Any]],
             scores: Mapping[str, Mapping[str, float]], registered: list[dict[str, str]],
             setup: dict[str, Any], seconds: float = 0.0,
             workspace: Path | None = None) -> dict[str, Any]:
    """Decide from measurements (live or recorded), promote on pass, write the outputs;
    on fail raise ``StageError`` with the table of misses, alias untouched."""
    from idlm.serving import gate_report
    from idlm.stage import write_json_atomic

    out = cfg.out("gate")
    candidates = tuple(arm for arm in cfg.gate.arms if arm != BASELINE)
    decision = decide(measurements, Thresholds.from_config(cfg.gate), scores, candidates)
    promoted = promote(registered, cfg.gate.alias, workspace) if decision.passed else []
    record = {**decision_record(decision), "setup": setup, "promoted": promoted,
              "thresholds": cfg.gate.model_dump(mode="json")["min_speedup"],
              "measurements": {arm: {str(c): v for c, v in levels.items()}
                               for arm, levels in measurements.items()}}
    write_json_atomic(out / "report.json", record)
    summary = gate_report.metrics(measurements, decision, seconds)
    write_json_atomic(out / "metrics.json", summary)
    if measurements:
        gate_report.plot(measurements, out / "throughput_latency.png",
                         f"{cfg.profile} gate: AR vs ISD / R-ISD, stride N={cfg.gate.stride}")
    _write_text(out / "report.md", gate_report.markdown(measurements, decision, setup, promoted))
    if not decision.passed:
        raise StageError(f"gate failed, alias '{cfg.gate.alias}' untouched; "
                         f"{len(decision.misses)} check(s) missed (see {out / 'report.md'}):\n"
                         + misses_table(decision.misses))
    return summary


def _setup(cfg: Any, plan: Any, targets: list[ArmTarget]) -> dict[str, Any]:
    from importlib.metadata import version

    return {"guidellm": version("guidellm"), "concurrencies": list(plan.concurrencies),
            "repeats": plan.repeats, "output_tokens": plan.output_tokens,
            "stride": cfg.gate.stride, "request_format": plan.request_format,
            "temperature": plan.temperature, "server_args": list(cfg.gate.server_args),
            "prompts": (f"{cfg.gate.prompt_file} ({len(plan.prompts)})" if plan.prompts
                        else f"synthetic, {plan.prompt_tokens} tokens"),
            "requests_per_level": {str(c): plan.requests_at(c) for c in plan.concurrencies},
            "arms": {t.name: t.url or f"idlm serve --mode {t.name} --model {t.model}"
                     + (f" --adapter {t.adapter}" if t.adapter else "") for t in targets}}


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
