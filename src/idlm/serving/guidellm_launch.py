"""``python -m idlm.serving.guidellm_launch run ...``: guidellm's own CLI, started so that
its per-benchmark worker processes start fast.

guidellm builds a fresh worker group (a manager process and its workers) for every
sub-benchmark, from a ``forkserver`` (``GUIDELLM__MP_CONTEXT_TYPE``). A forkserver child
imports what it needs afresh unless the server preloaded it: on these 2-core machines
that was ~4 s between sub-benchmarks, 12 times per arm. Preloading guidellm's scheduler
and backends into the forkserver makes each child a plain fork of modules already
imported. Nothing guidellm measures changes: requests, timings and the report are its own.
"""

from __future__ import annotations

import multiprocessing
import sys

# What a worker process runs (scheduler, messaging, backends) and the schemas it sends.
PRELOAD = ["guidellm.scheduler.worker", "guidellm.scheduler.worker_group",
           "guidellm.backends", "guidellm.utils.messaging", "guidellm.schemas"]


def main() -> int:
    multiprocessing.set_forkserver_preload(PRELOAD)
    from guidellm.__main__ import cli

    sys.argv[0] = "guidellm"
    return cli()


if __name__ == "__main__":   # forkserver children import this module again: run nothing
    sys.exit(main())
