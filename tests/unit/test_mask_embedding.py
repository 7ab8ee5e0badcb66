"""The gated MASK-embedding delta of the R-ISD adapter: MASK rows only, saved, trained,
applied by the SGLang plugin as in training, and lossless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from idlm.model.adapter_files import base_fingerprint, load_gated_lora, save_gated_lora
from idlm.model.gated_lora import (
    MASK_EMBEDDING_FILE,
    GatedLoraError,
    attach_gated_lora,
    explicit_gate,
    find_token_gate,
    gate_from_token_ids,
)
from tests.unit.test_gated_lora import (  # noqa: F401 - `trained` is a fixture
    MASK_TOKEN_ID,
    assert_mask_rows_only_differ,
    batch_with_masks,
    logits_of,
    tiny_base,
    trained,
)


def gated_with_delta(seed: int = 0) -> PeftModel:
    """A fresh adapter (LoRA B = 0) whose MASK-embedding delta alone is non-zero."""
    gated = attach_gated_lora(
        tiny_base(seed), MASK_TOKEN_ID, rank=4, alpha=8.0, dropout=0.0, mask_embedding=True
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        find_token_gate(gated).mask_embedding.delta.normal_(0, 0.5, generator=generator)
    return gated.eval()


def delta_of(model: torch.nn.Module) -> torch.Tensor:
    return find_token_gate(model).mask_embedding.delta


def test_mask_embedding_delta_changes_mask_rows_only() -> None:
    reference_base, gated = tiny_base(), gated_with_delta()
    trainable = [n for n, p in gated.named_parameters() if p.requires_grad]
    assert "base_model.model.model.idlm_mask_embedding.delta" in trainable
    assert_mask_rows_only_differ(gated, reference_base)


def test_mask_embedding_delta_follows_the_explicit_gate() -> None:
    reference_base, gated = tiny_base(), gated_with_delta()
    tail = batch_with_masks(7, middle_run=False)
    expected = logits_of(reference_base, tail)
    # The engine gates by position: an all-closed gate is the base even at MASK tokens ...
    with explicit_gate(gated, torch.zeros_like(tail, dtype=torch.bool)):
        assert torch.equal(logits_of(gated, tail), expected)
    # ... and an open gate shifts a non-MASK token (rows before it stay exact).
    gate = torch.zeros_like(tail, dtype=torch.bool)
    gate[:, 2] = True
    with explicit_gate(gated, gate):
        logits = logits_of(gated, tail)
    assert torch.equal(logits[:, :2], expected[:, :2])
    assert (logits[:, 2] - expected[:, 2]).abs().amax() > 1e-3
    # Given embeddings: a lookup outside the decoder is the base's; the decoder shifts them.
    embeds = gated.get_input_embeddings()(tail).detach()
    assert torch.equal(embeds, reference_base.get_input_embeddings()(tail))
    with torch.no_grad(), explicit_gate(gated, gate_from_token_ids(tail, MASK_TOKEN_ID)):
        from_embeds = gated(inputs_embeds=embeds).logits
    assert torch.equal(from_embeds, logits_of(gated, tail))


def test_mask_embedding_survives_save_and_load(tmp_path: Path) -> None:
    gated, adapter_dir = gated_with_delta(), tmp_path / "adapter"
    save_gated_lora(gated, adapter_dir, base_fingerprint(gated))
    gate_record = json.loads((adapter_dir / "idlm_gate.json").read_text())
    assert gate_record["mask_embedding"] == MASK_EMBEDDING_FILE == "idlm_mask_embedding.safetensors"
    loaded = load_gated_lora(tiny_base(), adapter_dir)
    assert torch.equal(delta_of(loaded), delta_of(gated)) and delta_of(gated).abs().amax() > 0
    assert not delta_of(loaded).requires_grad
    token_ids = batch_with_masks(seed=11)
    assert torch.equal(logits_of(loaded, token_ids), logits_of(gated, token_ids))
    assert delta_of(load_gated_lora(tiny_base(), adapter_dir, is_trainable=True)).requires_grad
    (adapter_dir / MASK_EMBEDDING_FILE).unlink()
    with pytest.raises(GatedLoraError, match=f"missing {MASK_EMBEDDING_FILE}"):
        load_gated_lora(tiny_base(), adapter_dir)


def test_adapter_without_mask_embedding_still_loads(trained, tmp_path: Path) -> None:  # noqa: F811
    from idlm.serving.sglang.lora import read_mask_embedding

    gated, _, _ = trained  # attached with the default mask_embedding=False
    adapter_dir = tmp_path / "adapter"
    save_gated_lora(gated_with_delta(), adapter_dir, base_fingerprint(gated))
    # Saved over an adapter that had a delta: the stale file stays, the record drops it.
    save_gated_lora(gated, adapter_dir, base_fingerprint(gated))
    assert "mask_embedding" not in json.loads((adapter_dir / "idlm_gate.json").read_text())
    loaded = load_gated_lora(tiny_base(), adapter_dir)
    assert find_token_gate(loaded).mask_embedding is None
    assert not any("idlm_mask_embedding" in name for name, _ in loaded.named_parameters())
    token_ids = batch_with_masks(seed=12)
    assert torch.equal(logits_of(loaded, token_ids), logits_of(gated, token_ids))
    assert read_mask_embedding(adapter_dir) is None


def test_mask_embedding_learns_from_the_ic_mask_loss() -> None:
    from idlm.objective import CLEAN, build_ic_batch, hidden_states, ic_loss

    gated = attach_gated_lora(
        tiny_base(), MASK_TOKEN_ID, rank=4, alpha=8.0, dropout=0.0, mask_embedding=True
    ).train()
    delta = delta_of(gated)
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(1, MASK_TOKEN_ID, (4, 12), generator=generator).tolist()
    batch = build_ic_batch(sequences, [4] * 4, 3, MASK_TOKEN_ID, 0)
    # Clean rows never attend to a MASK row, so nothing on them depends on the delta.
    clean_hidden = hidden_states(gated, batch, "sdpa", torch.float32)[batch.kind == CLEAN]
    (clean_grad,) = torch.autograd.grad(clean_hidden.sum(), delta)
    assert torch.equal(clean_grad, torch.zeros_like(delta))
    optimizer = torch.optim.AdamW([delta], lr=0.1)
    losses = []
    for _ in range(5):
        loss = ic_loss(gated, batch, alpha=0.0).total
        optimizer.zero_grad()
        loss.backward()
        assert delta.grad is not None and delta.grad.abs().amax() > 0
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses


def test_sglang_shift_matches_the_training_embeddings(tmp_path: Path) -> None:
    from idlm.serving.sglang.lora import GateBuffer, MaskEmbeddingShift, read_mask_embedding

    gated = gated_with_delta()
    save_gated_lora(gated, tmp_path / "adapter", base_fingerprint(gated))
    token_ids = batch_with_masks(seed=4)
    layer_inputs: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        layer_inputs.append(kwargs.get("hidden_states", args[0] if args else None))

    first_layer = gated.get_base_model().model.layers[0]
    handle = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
    logits_of(gated, token_ids)
    handle.remove()
    gate = GateBuffer(64, "cpu")
    gate.write(gate_from_token_ids(token_ids, MASK_TOKEN_ID))
    shift = MaskEmbeddingShift(read_mask_embedding(tmp_path / "adapter"), gate)
    with torch.no_grad():  # SGLang's layer input: flat rows, called (positions, hidden, batch)
        embeddings = tiny_base().get_input_embeddings()(token_ids).reshape(-1, 64)
    (_, shifted, _), _ = shift(first_layer, ("positions", embeddings, "batch"), {})
    assert torch.equal(shifted, layer_inputs[0].reshape(-1, 64))
    gate.clear()
    assert shift(first_layer, ("positions", embeddings, "batch"), {}) is None


def test_risd_with_a_mask_embedding_delta_is_lossless() -> None:
    from idlm.decoding.verify import lossless_check
    from tests.conftest import tiny_qwen3
    from tests.unit.test_decoding_models import pattern_prompts

    risd = attach_gated_lora(
        tiny_qwen3(seed=8), MASK_TOKEN_ID, rank=4, alpha=8.0, dropout=0.0, mask_embedding=True
    ).eval()
    with torch.no_grad():
        delta_of(risd).normal_(0, 0.5, generator=torch.Generator().manual_seed(8))
    report = lossless_check(
        tiny_qwen3(seed=8),
        risd,
        pattern_prompts(6, seed=71),
        MASK_TOKEN_ID,
        stride=4,
        max_new_tokens=16,
        stop_token_ids=[],
    )
    assert report["passed"] and report["mismatches"] == 0 and report["mode"] == "risd"
