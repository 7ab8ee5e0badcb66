"""The Prefect flow ``idlm-full``: every DVC stage of ``dvc.yaml`` as one task, in DAG order.

Each task runs ``dvc repro --single-item <stage>``: DVC alone decides whether the stage
runs or is skipped (Prefect caches nothing), and stages of one flow run go one at a time.
Per-stage retries come from the config's ``flow`` section (or the ``retries`` parameter).
Stage output streams into the Prefect log line by line. Parameters: ``profile`` (made
active as ``idlm config use`` does; none keeps ``params.yaml``), the stages (all, ``only``
some, or ``from_stage`` and what is downstream of it), ``overrides`` (applied to
``params.yaml`` as ``dvc exp run -S`` applies them). MLflow gets one parent run per flow
run and one child run per stage (see ``idlm.orchestration.run``).

Run it with no server to start (Prefect's ephemeral mode):
    python flows/idlm_full.py --profile tiny
Deployments: ``prefect.yaml`` (``idlm-full/local``, ``idlm-full/cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from idlm import config as config_mod
from idlm.cluster import preflight
from idlm.orchestration.dvc_runner import StageOutcome, repro_stage
from idlm.orchestration.lock import WorkspaceBusy, holder_info, workspace_lock
from idlm.orchestration.params import flow_settings, prepare_params, use_workspace
from idlm.orchestration.pipeline import Pipeline, SelectionError, load_pipeline
from idlm.orchestration.run import FlowContext, PipelineFailed, PipelineRun

FLOW_NAME = "idlm-full"


@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(stage: str, workspace: str) -> StageOutcome:
    """``dvc repro --single-item <stage>``, its output streamed into this task's log."""
    logger = get_run_logger()
    outcome = repro_stage(stage, Path(workspace), on_line=logger.info)
    outcome.task_run_id = str(task_run.id or "")
    logger.info("DVC %s stage '%s' in %.1fs", outcome.status, stage, outcome.seconds)
    return outcome


def stage_names(workspace: Path | None = None) -> list[str]:
    """The flow's tasks, in the order it runs them (read from dvc.yaml)."""
    return load_pipeline(workspace or config_mod.workspace()).names


def _run_stages(run: PipelineRun, selected: list[str], workspace: Path) -> None:
    logger = get_run_logger()
    for stage in selected:
        blocked = run.blocked_by(stage)
        if blocked:
            logger.warning("not running '%s': upstream %s failed", stage, ", ".join(blocked))
            run.not_run(stage, blocked)
            continue
        child = run.begin(stage)
        began = time.perf_counter()
        attempt = dvc_stage.with_options(
            task_run_name=stage, retries=run.settings.retries_for(stage),
            retry_delay_seconds=run.settings.retry_delay_seconds)
        try:
            outcome = attempt(stage, str(workspace))
        except Exception as exc:  # the stage failed (after its retries): record, go on
            run.failed(stage, child, exc, time.perf_counter() - began)
            continue
        except BaseException as exc:  # interrupted or cancelled: close the runs, stop
            run.tracker.finish(child, "KILLED", f"interrupted: {exc!r}")
            raise
        run.done(stage, child, outcome)


def _parameters(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v not in (None, [], "")}


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=True)
def idlm_full(profile: str | None = None, only: list[str] | None = None,
              from_stage: str | None = None, overrides: list[str] | None = None,
              retries: int | None = None, workspace: str | None = None) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage; returns the summary (raises if a stage failed)."""
    from idlm.tracking import open_tracker

    began = time.perf_counter()
    root = Path(workspace).resolve() if workspace else config_mod.workspace()
    run_id, run_name = str(flow_run.id or ""), str(flow_run.name or "")
    with use_workspace(root), workspace_lock(root, holder_info(run_id, run_name)):
        pipeline: Pipeline = load_pipeline(root)
        selected = pipeline.select(only, from_stage)
        params = root / "params.yaml"
        before = params.read_bytes() if params.is_file() else None
        cfg = prepare_params(root, profile, list(overrides or []))
        # A training plan that cannot fit GPU memory fails here, in one line, not hours in,
        # and leaves params.yaml as it found it.
        try:
            preflight.check(cfg, selected)
        except preflight.PreflightError:
            _restore(params, before)
            raise
        settings = flow_settings(cfg, retries, pipeline.names)
        _secrets_from_blocks(settings.secrets)
        data = _refresh_data(root, cfg)   # new data -> a new tracked version
        if data is not None:
            cfg = prepare_params(root, None, [data.override()])
        context = FlowContext(run_id, run_name, cfg.profile, selected, _parameters(
            profile=profile, only=only, from_stage=from_stage, overrides=overrides,
            retries=retries))
        run = PipelineRun(open_tracker(root), pipeline, cfg.model_dump(mode="json"),
                          settings, context)
        if data is not None:
            run.tracker.set_tags(run.parent_id, {"idlm.data_source": data.source,
                                                 "idlm.data_version": data.version})
        try:
            _run_stages(run, selected, root)
        except BaseException as exc:
            run.finish("KILLED", f"flow run interrupted: {exc!r}")
            raise
        result = run.finish()
        result["setup_seconds"] = run.began - began  # lock, dvc.yaml, params, MLflow
        if settings.push and not result["failed"]:
            result["published"] = _publish(run, root, run_name, result["parent_run_id"])
    create_markdown_artifact(f"```\n{result['summary']}\n```", key="idlm-full-summary",
                             description="stages, key metrics and where to look")
    get_run_logger().info("%s: MLflow parent run %s; %s", result["state"],
                          result["parent_run_id"], result["mlflow"])
    if result["failed"]:
        raise PipelineFailed(f"stage(s) {', '.join(result['failed'])} failed; see the MLflow "
                             f"run {result['parent_run_id']} and the task logs",
                             result["summary"])
    return result


def _secrets_from_blocks(blocks: dict[str, str]) -> None:
    """``flow.secrets``: each unset variable from its Prefect Secret block, into this
    process's environment only (stages inherit it; nothing is logged or written)."""
    from prefect.blocks.system import Secret

    for name, block in blocks.items():
        if os.environ.get(name):
            continue
        try:
            os.environ[name] = Secret.load(block).get()
        except ValueError as exc:
            raise config_mod.ConfigError(
                f"flow.secrets.{name}: no Prefect Secret block {block!r} ({exc}); create it "
                f"with `prefect block create secret` or set {name} in the environment") from None


def _restore(path: Path, content: bytes | None) -> None:
    if content is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(content)


def _refresh_data(root: Path, cfg: config_mod.Config) -> Any:
    """The data source resolved to an immutable version (idlm.data.refresh), or None."""
    from idlm.data.refresh import refresh

    data = refresh(root, cfg)
    if data is not None:
        get_run_logger().info("data %s is version %s (%s)", data.source, data.version, data.kind)
    return data


def _publish(run: PipelineRun, root: Path, run_name: str, parent_id: str) -> dict[str, str]:
    """``flow.push``: outputs to the DVC remote, the lock to branch idlm-runs/<run name>."""
    from idlm.orchestration.storage import publish_run

    published = publish_run(root, run_name or run.context.flow_run_id)
    run.tracker.set_tags(parent_id, {f"idlm.{key}": value for key, value in published.items()})
    get_run_logger().info("pushed outputs; dvc.lock recorded as %s (%s)", published["branch"],
                          published["commit"][:12])
    return published


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flows/idlm_full.py", description="Run the idlm-full Prefect flow (DVC stages in "
        "DAG order, tracked in MLflow). Without a configured Prefect server it runs in "
        "Prefect's ephemeral mode: nothing to start by hand.")
    parser.add_argument("--profile", default=None,
                        help="make this profile active first (default: keep params.yaml)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--only", action="append", default=None, metavar="STAGE",
                        help="run only this stage (repeatable)")
    chosen.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                        help="run this stage and everything downstream of it")
    parser.add_argument("--retries", type=int, default=None,
                        help="retries per stage (default: the config's flow section)")
    parser.add_argument("--workspace", default=None, help="default: the current checkout")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the summary as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="param overrides, as `dvc exp run -S` takes them")
    return parser


def _warm_imports() -> None:
    """Import what the flow body needs (mlflow, dvc) while Prefect's ephemeral server starts
    in its own process: the two overlap instead of adding up (a few seconds per run)."""
    import dvc.repo  # noqa: F401
    import dvc.utils.hydra  # noqa: F401

    import idlm.tracking  # noqa: F401


def _start_warm_imports() -> None:
    from prefect.settings import get_current_settings

    if get_current_settings().api.url is None:
        # Ephemeral mode imports the whole Prefect server module in this process first;
        # doing it before the warm-up thread starts keeps the two from contending for the
        # GIL, so the warm-up runs while the server process boots instead.
        import prefect.server.api.server  # noqa: F401
    threading.Thread(target=_warm_imports, name="warm-imports", daemon=True).start()


def _patient_ephemeral_server():  # noqa: ANN202 - a context manager
    """Without PREFECT_API_URL the flow starts an ephemeral server, which Prefect gives 20 s
    to answer; on a busy 2-core machine its imports alone take longer (the suite's
    README-command test timed out beside the retraining test's stages). Prefect reads
    its settings when it is imported, so the environment is too late: set it here."""
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT,
    )
    from prefect.settings import temporary_settings

    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        return contextlib.nullcontext()
    return temporary_settings(updates={STARTUP_TIMEOUT: 180})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # No network: the ephemeral server must not try to send telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _start_warm_imports()
    try:
        with _patient_ephemeral_server():
            result = idlm_full(profile=args.profile, only=args.only,
                               from_stage=args.from_stage, overrides=args.overrides,
                               retries=args.retries, workspace=args.workspace)
    except (WorkspaceBusy, SelectionError, config_mod.ConfigError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except PipelineFailed as exc:
        print(f"\n{exc.summary}\n\nerror: {exc}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n{result['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
