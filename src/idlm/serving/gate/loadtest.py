"""Load tests with guidellm against OpenAI-compatible servers (``idlm serve`` or SGLang).

The load comes from guidellm (a well-kept load generator), never from a loop of ours:
one ``guidellm run`` per arm with a scenario file that holds every concurrency level and
repeat as a sub-benchmark (fixed ``concurrent`` streams, a request count per level,
prompts from a file or synthetic, exactly ``output_tokens`` tokens per request through
``max_tokens`` + ``ignore_eos``). Its JSON report is parsed into one ``LevelRun`` per
sub-benchmark; ``summarise`` takes the median over repeats.

Everything runs offline: guidellm counts tokens with a local tokenizer folder (or a
cached hub id) and ``HF_HUB_OFFLINE=1`` is set for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from idlm.errors import StageError

METRICS = ("per_request_tok_s", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
           "tpot_p50_ms", "tpot_p99_ms")


@dataclass(frozen=True)
class LoadPlan:
    """What guidellm sends to each arm; the same plan for every arm of a gate."""

    concurrencies: tuple[int, ...]
    repeats: int
    min_requests: int
    requests_per_stream: int
    output_tokens: int
    tokenizer: str
    prompts: tuple[str, ...] = ()     # empty: synthetic text of prompt_tokens tokens
    prompt_tokens: int = 128
    request_format: str = "/v1/chat/completions"
    temperature: float = 0.0
    max_seconds_per_level: float | None = None
    generator_workers: int | None = None
    seed: int = 0

    def requests_at(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_stream * concurrency)

    def schedule(self) -> list[int]:
        """Sub-benchmark order: every level once per repeat, so slow drift hits all levels."""
        return [c for _ in range(self.repeats) for c in self.concurrencies]


@dataclass(frozen=True)
class LevelRun:
    """One sub-benchmark of guidellm's report: one concurrency level, one repeat."""

    concurrency: int
    repeat: int
    successful: int
    errored: int
    incomplete: int
    per_request_tok_s: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(model: Path, mode: str, stride: int, port: int, adapter: Path | None,
                  extra_args: Sequence[str] = ()) -> list[str]:
    """``idlm serve`` with this interpreter, so the server runs the same code as the gate."""
    command = [sys.executable, "-c", "import sys; from idlm.cli import main; sys.exit(main())",
               "serve", "--model", str(model), "--mode", mode, "--stride", str(stride),
               "--port", str(port)]
    if adapter is not None:
        command += ["--adapter", str(adapter)]
    return command + list(extra_args)


@dataclass(frozen=True)
class ServerSpec:
    """One ``idlm serve`` to start: its command line, port and log file."""

    command: list[str]
    port: int
    log_path: Path


@contextmanager
def idlm_servers(specs: Sequence[ServerSpec], startup_timeout_s: float,
                 threads: int | None = None) -> Iterator[list[str]]:
    """Start every server at once (their start-ups overlap), yield their base URLs once all
    answer /v1/models (so none is still loading while another is measured); always stop
    them all."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    processes: list[subprocess.Popen] = []
    try:
        for spec in specs:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(spec.log_path, "w") as log:
                processes.append(subprocess.Popen(spec.command, stdout=log,
                                                  stderr=subprocess.STDOUT, env=env))
        urls = [f"http://127.0.0.1:{spec.port}" for spec in specs]
        _wait_for_all(urls, processes, [spec.log_path for spec in specs], startup_timeout_s)
        yield urls
    finally:
        for process in processes:   # all told at once: their shutdowns overlap
            if process.poll() is None:
                process.terminate()
        for process in processes:
            stop(process)


def stop(process: subprocess.Popen) -> None:
    """Terminate (if still running) and reap; killed when it takes over 30 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _model_id(url: str) -> str | None:
    """The first model ``/v1/models`` lists, or None while the server is not up."""
    import httpx

    try:
        reply = httpx.get(f"{url}/v1/models", timeout=5.0)
        if reply.status_code == 200 and reply.json().get("data"):
            return reply.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError):
        pass
    return None


def _wait_for_all(urls: Sequence[str], processes: Sequence[subprocess.Popen | None],
                  logs: Sequence[Path | None], timeout_s: float) -> list[str]:
    """Poll every server until each lists a model; a process that exits first, or a server
    still silent after ``timeout_s``, fails with its log's tail. Returns the model ids."""
    ready: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for url, process, log in zip(urls, processes, logs, strict=True):
            if url in ready:
                continue
            if process is not None and process.poll() is not None:
                raise StageError(f"the server for {url} exited with code "
                                 f"{process.returncode} before it was ready: {_tail(log)}")
            model = _model_id(url)
            if model is not None:
                ready[url] = model
        if len(ready) == len(urls):
            return [ready[url] for url in urls]
        if time.monotonic() >= deadline:
            url, log = next((u, g) for u, g in zip(urls, logs, strict=True) if u not in ready)
            raise StageError(f"no OpenAI-compatible server answered at {url}/v1/models within "
                             f"{timeout_s:.0f} s (raise gate.startup_timeout_s or check the "
                             "server)" + (f": {_tail(log)}" if log else ""))
        time.sleep(0.5)


def wait_until_ready(url: str, timeout_s: float, process: subprocess.Popen | None = None,
                     log_path: Path | None = None) -> str:
    """Poll ``/v1/models`` until it lists a model; return that model's id."""
    return _wait_for_all([url], [process], [log_path], timeout_s)[0]


def warm_up(url: str, plan: LoadPlan) -> None:
    """Before measuring: one burst of short requests at each concurrency level, so lazy
    initialisation and first-seen batch shapes are not timed."""
    model = wait_until_ready(url, 30.0)
    for concurrency in sorted(set(plan.concurrencies)):
        asyncio.run(_burst(url, model, plan, concurrency))


async def _burst(url: str, model: str, plan: LoadPlan, concurrency: int) -> None:
    import httpx

    def body(index: int) -> dict[str, Any]:
        text = plan.prompts[index % len(plan.prompts)] if plan.prompts else "Hello"
        payload: dict[str, Any] = {"model": model, "max_tokens": min(8, plan.output_tokens),
                                   "temperature": plan.temperature}
        if plan.request_format.endswith("chat/completions"):
            payload["messages"] = [{"role": "user", "content": text}]
        else:
            payload["prompt"] = text
        return payload

    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(limits=limits, timeout=600.0) as client:
        replies = await asyncio.gather(*[client.post(f"{url}{plan.request_format}",
                                                     json=body(i))
                                         for i in range(concurrency)])
    failed = [reply for reply in replies if reply.status_code != 200]
    if failed:
        raise StageError(f"warm-up at concurrency {concurrency} on {url}{plan.request_format}"
                         f": HTTP {failed[0].status_code}: {failed[0].text[:300]}")


def decoding_stats(url: str) -> dict[str, Any] | None:
    """Tokens per forward and per-draft acceptance from ``idlm serve``'s JSON ``/metrics``
    (warm-up included); None for servers without it (SGLang serves Prometheus text)."""
    import httpx

    try:
        snapshot = httpx.get(f"{url}/metrics", timeout=10.0).json()
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(snapshot, dict) or "tokens_per_forward" not in snapshot:
        return None
    return {"tokens_per_forward": snapshot["tokens_per_forward"],
            "acceptance": snapshot.get("acceptance"),
            "completion_tokens": snapshot.get("completion_tokens")}


def _tail(path: Path | None, lines: int = 5) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


# ------------------------------------------------------------------ guidellm
def scenario(plan: LoadPlan, target: str, prompt_file: Path | None, report: Path) -> dict:
    """A guidellm scenario: one sub-benchmark per (repeat, concurrency) in ``schedule``."""
    if prompt_file is not None:
        data = [{"kind": "json_file", "path": str(prompt_file)}]
    else:
        data = [{"kind": "synthetic_text", "prompt_tokens": plan.prompt_tokens,
                 "output_tokens": plan.output_tokens}]
    constraints: list[dict[str, Any]] = [{"kind": "max_requests", "count": 1}]
    if plan.max_seconds_per_level is not None:
        constraints.append({"kind": "max_duration", "seconds": plan.max_seconds_per_level})
    backend: dict[str, Any] = {"kind": "openai_http", "target": target,
                               "request_format": plan.request_format,
                               "extras": {"body": {"temperature": plan.temperature}}}
    return {
        "metadata": {"name": "idlm-gate"},
        "spec": {
            "backend": backend,
            "profile": {"kind": "concurrent"},
            "tokenizer": {"kind": "huggingface_auto", "model": plan.tokenizer},
            "data": data,
            "constraints": constraints,
            "seed": {"kind": "static", "value": plan.seed},
            "outputs": [{"kind": "json", "path": str(report)}],
        },
        "benchmarks": [{"profile.streams": c, "constraints[0].count": plan.requests_at(c)}
                       for c in plan.schedule()],
    }


def write_prompt_file(plan: LoadPlan, path: Path) -> Path:
    """Rows guidellm maps by column name: ``prompt`` and ``output_tokens_count``; enough rows
    that no sub-benchmark runs out (prompts are reused in order)."""
    needed = sum(plan.requests_at(c) for c in plan.schedule())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index in range(needed):
            row = {"prompt": plan.prompts[index % len(plan.prompts)],
                   "output_tokens_count": plan.output_tokens}
            handle.write(json.dumps(row) + "\n")
    return path


START_DELAY_SETTING = "GUIDELLM__SCHEDULER_START_DELAY_NON_DISTRIBUTED"


def run_guidellm(plan: LoadPlan, target: str, workdir: Path,
                 timeout_s: float | None = None) -> list[LevelRun]:
    """Run guidellm on ``target`` and parse its JSON report (kept in ``workdir``)."""
    return run_guidellm_passes([(plan, target, workdir)], workdir, timeout_s)[0]


def run_guidellm_passes(passes: Sequence[tuple[LoadPlan, str, Path]], log_dir: Path,
                        timeout_s: float | None = None) -> list[list[LevelRun]]:
    """One guidellm pass per (plan, target, workdir), in order, in one guidellm process
    (``guidellm_launch passes``); each pass's scenario, prompts and report in its workdir,
    guidellm's output in ``log_dir/guidellm.out``. The parsed runs of each pass."""
    log_dir.mkdir(parents=True, exist_ok=True)
    scenarios = [_write_pass(*one) for one in passes]
    plan = passes[0][0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GUIDELLM__MP_CONTEXT_TYPE": "forkserver",
           "GUIDELLM__LOGGING__LOG_FILE": str(log_dir / "guidellm.log")}
    # guidellm waits 1 s after its workers are up before each sub-benchmark; they are up
    # (it waits on a barrier first), so 0.1 s: the gate runs dozens of sub-benchmarks.
    env.setdefault(START_DELAY_SETTING, "0.1")
    if plan.generator_workers is not None:
        env["GUIDELLM__MAX_WORKER_PROCESSES"] = str(plan.generator_workers)
    # guidellm with its forkserver preloaded, all passes in one start (guidellm_launch.py).
    command = [sys.executable, "-m", "idlm.serving.gate.guidellm_launch", "passes",
               *map(str, scenarios)]
    output = log_dir / "guidellm.out"
    with open(output, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout_s, check=False)
    reports = [workdir / "guidellm.json" for _, _, workdir in passes]
    failed = next((index for index, report in enumerate(reports) if not report.is_file()),
                  None)
    if done.returncode != 0 or failed is not None:
        target = passes[failed if failed is not None else -1][1]
        raise StageError(f"guidellm failed on {target} (exit {done.returncode}): "
                         f"{_tail(output, 3)} (full log: {output})")
    return [parse_report(json.loads(report.read_text())) for report in reports]


def _write_pass(plan: LoadPlan, target: str, workdir: Path) -> Path:
    """A pass's prompt file and scenario in ``workdir`` (its report goes there too)."""
    workdir.mkdir(parents=True, exist_ok=True)
    prompt_file = write_prompt_file(plan, workdir / "prompts.jsonl") if plan.prompts else None
    report = workdir / "guidellm.json"
    report.unlink(missing_ok=True)
    scenario_path = workdir / "scenario.json"
    scenario_path.write_text(json.dumps(scenario(plan, target, prompt_file, report), indent=2))
    return scenario_path


def parse_report(report: dict[str, Any]) -> list[LevelRun]:
    """One ``LevelRun`` per guidellm sub-benchmark, repeats numbered per concurrency level.

    ``per_request_tok_s`` is the median over successful requests of output tokens / that
    request's end-to-end latency (guidellm's per-request ``output_tokens_per_second``);
    ``output_tok_s`` is guidellm's server-wide output token rate over the level."""
    runs: list[LevelRun] = []
    seen: dict[int, int] = {}
    for bench in sorted(report.get("benchmarks", []), key=lambda b: b["config"]["run_index"]):
        concurrency = int(bench["config"]["strategy"]["streams"])
        repeat = seen.get(concurrency, 0)
        seen[concurrency] = repeat + 1
        metrics = bench["metrics"]
        totals = metrics["request_totals"]
        requests = bench.get("requests", {}).get("successful") or []
        per_request = [r["output_tokens_per_second"] for r in requests
                       if r.get("output_tokens_per_second") is not None]
        runs.append(LevelRun(
            concurrency=concurrency, repeat=repeat, successful=int(totals["successful"]),
            errored=int(totals["errored"]), incomplete=int(totals["incomplete"]),
            per_request_tok_s=median(per_request) if per_request else 0.0,
            output_tok_s=_stat(metrics, "output_tokens_per_second", "mean"),
            ttft_p50_ms=_stat(metrics, "time_to_first_token_ms", "p50"),
            ttft_p99_ms=_stat(metrics, "time_to_first_token_ms", "p99"),
            tpot_p50_ms=_stat(metrics, "time_per_output_token_ms", "p50"),
            tpot_p99_ms=_stat(metrics, "time_per_output_token_ms", "p99")))
    return runs


def _stat(metrics: dict[str, Any], name: str, statistic: str) -> float:
    successful = (metrics.get(name) or {}).get("successful") or {}
    if statistic == "mean":
        return float(successful.get("mean") or 0.0)
    return float((successful.get("percentiles") or {}).get(statistic) or 0.0)


def summarise(runs: Sequence[LevelRun]) -> dict[int, dict[str, Any]]:
    """Per concurrency level: the median of each figure over repeats, summed request counts
    and the raw repeats (so a report shows the spread)."""
    levels: dict[int, dict[str, Any]] = {}
    for concurrency in sorted({run.concurrency for run in runs}):
        own = [run for run in runs if run.concurrency == concurrency]
        summary: dict[str, Any] = {name: median(getattr(r, name) for r in own)
                                   for name in METRICS}
        summary.update(repeats=len(own), successful=sum(r.successful for r in own),
                       errored=sum(r.errored for r in own),
                       incomplete=sum(r.incomplete for r in own),
                       runs=[asdict(r) for r in own])
        levels[concurrency] = summary
    return levels
