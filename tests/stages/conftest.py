"""The small trained pipeline (prepare -> base -> ic, killed and resumed -> lora), built once
per test session and shared by the training-stage and downstream-stage tests."""

from __future__ import annotations

import pytest

from idlm.config import load_profile
from idlm.data.prepare import run as prepare
from idlm.training import base, ic, lora
from tests.small_configs import SMALL


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = load_profile("tiny", [f"outputs={tmp_path_factory.mktemp('out')}", *SMALL])
    prepare(cfg)
    results = {"cfg": cfg, "base": base.run(cfg)}
    # Killed at step 5 (last checkpoint: 4, in phase N=2), so the resumed run crosses the
    # N=2 -> N=3 boundary at step 6.
    results["ic_killed"] = ic.run(cfg, stop_after=5)
    results["ic"] = ic.run(cfg)
    results["lora"] = lora.run(cfg)
    return results
