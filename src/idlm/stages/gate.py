"""The ``gate`` stage: load-test I-DLM (ISD) and R-ISD against the AR base, add the quality
deltas from ``evaluate``, and promote the exported bundles only if every check passes.

Method. Each arm is served by the same engine with the same flags (``idlm serve --mode
ar|isd|risd`` on a free port, or an external SGLang URL per arm) and loaded by guidellm
(``loadtest``) at each concurrency level, ``repeats`` times; the gate takes the median over
repeats. When every arm is up at once (``start_together``, or URLs), the arms take turns:
AR, ISD, R-ISD at C=1, then at C=4, ..., then the next repeat, so a machine whose speed
drifts over minutes slows every arm alike instead of the arm measured last (seen on shared CPUs:
the same weights gave ISD 2.20x and 1.86x at C=1 in two runs measured arm after arm).
Otherwise (one GPU holds one arm at a time) each arm runs all its repeats in turn. Per arm
and level it records per-request tok/s, server output tok/s, TTFT and TPOT p50/p99 and
errors.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idlm.errors import StageError
from idlm.serving.gate.decision import (
    BASELINE,
    Thresholds,
    decide,
    decision_record,
    misses_table,
    read_scores,
)

LOG = logging.getLogger("idlm.gate")
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
    from idlm.config.paths import resolve_path

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
    from idlm.config.paths import resolve_path
    from idlm.serving.gate.loadtest import LoadPlan

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


def _server_spec(target: ArmTarget, gate: Any, workdir: Path) -> Any:
    from idlm.serving.gate import loadtest

    port = loadtest.free_port()
    return loadtest.ServerSpec(loadtest.serve_command(target.model, target.name, gate.stride,
                                                      port, target.adapter, gate.server_args),
                               port, workdir / target.name / "server.log")


def measure_arms(targets: list[ArmTarget], plan: Any, gate: Any,
                 workdir: Path) -> dict[str, tuple[dict[int, Any], dict[str, Any] | None]]:
    """Serve (or reach) every arm, then one at a time warm it up and load it with guidellm:
    per arm, the summary per level and the server's decoding statistics (TPF, acceptance)
    where it reports them. ``gate.start_together``: the `idlm serve` arms start at once,
    are all up before the first is measured, and take turns at each level of each repeat
    (``_interleaved``);
    otherwise each starts when measured and runs all its repeats."""
    from contextlib import ExitStack

    from idlm.serving.gate import loadtest

    local = [t for t in targets if t.url is None]
    together = gate.start_together or not local
    measured = {}
    with ExitStack() as stack:
        urls = {t.name: t.url for t in targets if t.url is not None}
        if together and local:
            LOG.info("gate: starting %s together", ", ".join(t.name for t in local))
            started = stack.enter_context(loadtest.idlm_servers(
                [_server_spec(t, gate, workdir) for t in local], gate.startup_timeout_s,
                gate.server_threads))
            urls.update(zip((t.name for t in local), started, strict=True))
        if together:
            return _interleaved([(t.name, urls[t.name]) for t in targets], plan, gate,
                                workdir)
        for target in targets:
            LOG.info("gate: measuring arm %s", target.name)
            if target.name in urls:
                loadtest.wait_until_ready(urls[target.name], gate.startup_timeout_s)
                measured[target.name] = _load(urls[target.name], plan, workdir / target.name)
                continue
            with loadtest.idlm_servers([_server_spec(target, gate, workdir)],
                                       gate.startup_timeout_s, gate.server_threads) as (url,):
                measured[target.name] = _load(url, plan, workdir / target.name)
    return measured


def _interleaved(arms: list[tuple[str, str]], plan: Any, gate: Any, workdir: Path
                 ) -> dict[str, tuple[dict[int, Any], dict[str, Any] | None]]:
    """Warm every arm up, then one guidellm pass per (repeat, level, arm): at each level
    of each repeat the arms in turn, so the two sides of a ratio are measured seconds
    apart; all passes in one guidellm process. Each pass in ``<arm>/repeat-<r>/c<C>/``,
    guidellm's output in ``guidellm.out``."""
    from dataclasses import replace

    from idlm.serving.gate import loadtest

    for _, url in arms:
        loadtest.wait_until_ready(url, gate.startup_timeout_s)
        loadtest.warm_up(url, plan)
    order = [(repeat, level, name, url) for repeat in range(plan.repeats)
             for level in plan.concurrencies for name, url in arms]
    LOG.info("gate: measuring %s in turn at each level, %d repeat(s)",
             ", ".join(n for n, _ in arms), plan.repeats)
    passes = loadtest.run_guidellm_passes(
        [(replace(plan, concurrencies=(level,), repeats=1), url,
          workdir / name / f"repeat-{repeat}" / f"c{level}")
         for repeat, level, name, url in order], workdir)
    runs: dict[str, list[Any]] = {name: [] for name, _ in arms}
    for (repeat, _, name, _), passed in zip(order, passes, strict=True):
        runs[name] += [replace(run, repeat=repeat) for run in passed]
    return {name: (loadtest.summarise(runs[name]), loadtest.decoding_stats(url))
            for name, url in arms}


def _load(url: str, plan: Any, workdir: Path) -> tuple[dict[int, Any], dict[str, Any] | None]:
    from idlm.serving.gate import loadtest

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
        measured = measure_arms(targets, plan, cfg.gate, workdir)
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
    from idlm.serving.gate import report as gate_report
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
            "start_together": cfg.gate.start_together,
            "interleaved": cfg.gate.start_together or all(t.url for t in targets),
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
