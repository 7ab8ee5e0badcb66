"""Shared fixtures: tiny random Qwen3 models, seeded."""

from __future__ import annotations

import pytest
import torch

MASK_ID = 127
PAD_ID = 0
# `make test` runs the suite on two pytest-xdist workers. A scope is what one worker runs
# whole: each test file (its module fixtures are built once), except that every file using
# the suite's one trained workspace is one scope, so the workspace is trained once.
# (xdist's own --dist loadgroup cannot do this under pytest 9: it renames items through an
# attribute pytest no longer reads.)
TRAINED_SCOPE = "trained-workspace"
TRAINED_FILES = ("tests/stages/", "tests/e2e/test_dvc_pipeline.py", "tests/e2e/test_flow.py",
                 "tests/e2e/test_kill_stages.py", "tests/e2e/test_slurm.py",
                 "tests/e2e/test_storage.py")


def scope_of(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return TRAINED_SCOPE if path.startswith(TRAINED_FILES) else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ByScope(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    strays = [item.nodeid for item in items
              if "trained_workspace" in getattr(item, "fixturenames", ())
              and scope_of(item.nodeid) != TRAINED_SCOPE]
    if strays:
        raise pytest.UsageError(f"{strays[0]} uses trained_workspace: add its file to "
                                "TRAINED_FILES in tests/conftest.py (or it trains again)")


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
    summary = idlm_full(profile=PROFILE, workspace=str(root))
    return {"root": root, "summary": summary, "lock": (root / "dvc.lock").read_bytes()}
