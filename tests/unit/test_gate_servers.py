"""The gate starts its `idlm serve` arms together: one that dies names its exit code and
log, and every other server it started is stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from idlm.errors import StageError
from idlm.serving.gate.loadtest import ServerSpec, free_port, idlm_servers


def test_a_server_that_dies_at_start_up_stops_the_others(tmp_path: Path) -> None:
    slow = ServerSpec([sys.executable, "-c", "import time; time.sleep(120)"], free_port(),
                      tmp_path / "slow" / "server.log")
    dead = ServerSpec([sys.executable, "-c", "print('no weights here'); raise SystemExit(3)"],
                      free_port(), tmp_path / "dead" / "server.log")
    began = time.monotonic()
    with pytest.raises(StageError, match=r"exited with code 3 before it was ready.*no weights"):
        with idlm_servers([slow, dead], startup_timeout_s=60):
            pytest.fail("yielded without a ready server")
    assert time.monotonic() - began < 30
    children = psutil.Process().children(recursive=True)
    assert not [c for c in children if "time.sleep(120)" in " ".join(c.cmdline())]
