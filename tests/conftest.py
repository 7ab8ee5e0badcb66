"""Shared fixtures: tiny random Qwen3 models, seeded."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

MASK_ID = 127
PAD_ID = 0
# `make test` runs the suite on two pytest-xdist workers. A scope is what one worker runs
# whole: each test file (its module fixtures are built once), except that the files that
# use the suite's one trained workspace in place are one scope, so it is trained once, by
# that scope's worker. Files that only copy it use `trained_snapshot` and may run on the
# other worker. (xdist's own --dist loadgroup cannot do this under pytest 9: it renames
# items through an attribute pytest no longer reads.)
TRAINED_SCOPE = "trained-workspace"
TRAINED_FILES = ("tests/stages/", "tests/e2e/test_dvc_pipeline.py", "tests/e2e/test_flow.py",
                 "tests/e2e/test_kill_stages.py")
_TRAINER_RUNS = pytest.StashKey[bool]()


def scope_of(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return TRAINED_SCOPE if path.startswith(TRAINED_FILES) else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201
    from xdist.scheduler import LoadScopeScheduling

    # Scopes go out in collection order, not xdist's default of most tests first: the
    # end-to-end files come first, so the two longest scopes (the trained workspace and
    # the retraining runs, minutes each) start at once on the two workers and the short
    # files fill in behind them, instead of the retraining's three tests starting last.
    config.option.loadscopereorder = False

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ByScope(config, log)


@pytest.hookimpl(trylast=True)   # after -k / -m deselection: what will really run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def uses(item: pytest.Item, fixture: str) -> bool:
        return fixture in getattr(item, "fixturenames", ())

    strays = [item.nodeid for item in items
              if uses(item, "trained_workspace") and scope_of(item.nodeid) != TRAINED_SCOPE]
    if strays:
        raise pytest.UsageError(
            f"{strays[0]} uses trained_workspace outside its scope: add its file to "
            "TRAINED_FILES in tests/conftest.py, or copy `trained_snapshot` instead")
    config.stash[_TRAINER_RUNS] = any(uses(item, "trained_workspace") for item in items)


def tiny_qwen3(seed: int = 0, vocab: int = 128, attention: str = "sdpa"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=PAD_ID)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture
def model():
    return tiny_qwen3()


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for the run (no network), started on first use."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def trained_workspace(prefect_api, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The suite's one trained workspace (tests/workspace.py): the flow `idlm-full` runs
    every stage of the `test` profile in it once. Tests that change it work on a copy."""
    from flows.idlm_full import idlm_full
    from tests.workspace import PROFILE, make_workspace

    root = make_workspace(tmp_path_factory.mktemp("trained") / "workspace")
    shared = _shared_folder(tmp_path_factory)
    try:
        summary = idlm_full(profile=PROFILE, workspace=str(root))
    except BaseException as error:
        if shared is not None:   # the other worker stops waiting and fails with this line
            (shared / "failed.txt").write_text(f"{type(error).__name__}: {error}"[:2000])
        raise
    if shared is not None:       # before any test changes it: the other worker copies it
        from tests.workspace import copy_workspace

        copy_workspace(root, shared / "workspace")
        (shared / "ready.json").write_text(json.dumps(summary, default=str))
    return {"root": root, "summary": summary, "lock": (root / "dvc.lock").read_bytes()}


@pytest.fixture(scope="session")
def trained_snapshot(request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trained workspace as it was right after training, for tests that only copy it.
    Under xdist, when the other worker trains it, this waits for its snapshot; otherwise it
    is `trained_workspace` itself."""
    shared = _shared_folder(tmp_path_factory)
    if shared is None or not request.config.stash.get(_TRAINER_RUNS, False):
        return request.getfixturevalue("trained_workspace")
    deadline = time.monotonic() + 1800
    while not (shared / "ready.json").is_file():
        if (shared / "failed.txt").is_file():
            pytest.fail("the trained workspace failed to build: "
                        + (shared / "failed.txt").read_text())
        if time.monotonic() > deadline:
            pytest.fail("the other xdist worker did not finish the trained workspace in 30 min")
        time.sleep(1)
    root = shared / "workspace"
    return {"root": root, "summary": json.loads((shared / "ready.json").read_text()),
            "lock": (root / "dvc.lock").read_bytes()}


def _shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """A folder every xdist worker of this run sees (None without xdist)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return None
    folder = tmp_path_factory.getbasetemp().parent / TRAINED_SCOPE
    folder.mkdir(exist_ok=True)
    return folder
