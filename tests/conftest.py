"""Shared fixtures: tiny random Qwen3 models, seeded."""

from __future__ import annotations

import pytest
import torch

MASK_ID = 127
PAD_ID = 0


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
