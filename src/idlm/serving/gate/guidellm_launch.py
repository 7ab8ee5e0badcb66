"""``python -m idlm.serving.gate.guidellm_launch``: guidellm, started so that its worker
processes start fast and several load passes share one start.

guidellm builds a fresh worker group (a manager process and its workers) for every
sub-benchmark, from a ``forkserver`` (``GUIDELLM__MP_CONTEXT_TYPE``). A forkserver child
imports what it needs afresh unless the server preloaded it: on these 2-core machines
that was ~4 s between sub-benchmarks, 12 times per arm. Preloading guidellm's scheduler
and backends into the forkserver makes each child a plain fork of modules already
imported.

``passes SCENARIO...`` runs each guidellm scenario file in turn in this one process
(guidellm's own ``benchmark_generative_text``, what its CLI's ``run --scenario`` calls):
the gate's interleaved passes (one per arm, level and repeat) then pay guidellm's start-up
(~6 s here) once instead of once per pass. Any other arguments go to guidellm's CLI.
Nothing guidellm measures changes: requests, timings and the reports are its own.
"""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

# What a worker process runs (scheduler, messaging, backends) and the schemas it sends.
PRELOAD = ["guidellm.scheduler.worker", "guidellm.scheduler.worker_group",
           "guidellm.backends", "guidellm.utils.messaging", "guidellm.schemas"]


def run_passes(scenarios: list[str]) -> int:
    """Each scenario file in order; stops at the first that fails (its error on stderr)."""
    import asyncio

    import guidellm.entrypoints as entry
    from guidellm.schemas.benchmark import BenchmarkScenario
    from guidellm.utils.console import Console

    missing = [path for path in scenarios if not Path(path).is_file()]
    if not scenarios or missing:
        print(f"guidellm_launch passes: scenario file(s) not found: {missing or 'none given'}",
              file=sys.stderr)
        return 2
    for index, path in enumerate(scenarios, 1):
        print(f"[guidellm_launch] pass {index}/{len(scenarios)}: {path}", flush=True)
        args = BenchmarkScenario.create(scenario=Path(path))
        asyncio.run(entry.benchmark_generative_text(args=args, progress=False,
                                                    console=Console()))
    return 0


def main() -> int:
    multiprocessing.set_forkserver_preload(PRELOAD)
    if sys.argv[1:2] == ["passes"]:
        return run_passes(sys.argv[2:])
    from guidellm.__main__ import cli

    sys.argv[0] = "guidellm"
    return cli()


if __name__ == "__main__":   # forkserver children import this module again: run nothing
    sys.exit(main())
