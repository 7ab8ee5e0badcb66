"""Gated LoRA: non-MASK rows are bit-identical to the frozen base, before and after training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from idlm.model.adapter_files import base_fingerprint, load_gated_lora, save_gated_lora
from idlm.model.gated_lora import (
    GatedLinear,
    GatedLoraError,
    attach_gated_lora,
    explicit_gate,
    find_token_gate,
    gate_from_token_ids,
)

MASK_TOKEN_ID = 127
VOCAB_SIZE = 128
SEQUENCE_LENGTH = 12
TRAIN_STEPS = 6


def tiny_config(**overrides: object) -> Qwen3Config:
    fields: dict[str, object] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def tiny_base(seed: int = 0, **overrides: object) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_config(**overrides)).eval()


def batch_with_masks(seed: int, batch_size: int = 3, middle_run: bool = True) -> torch.Tensor:
    """Random tokens with a MASK run at the end (as in ISD) and optionally one mid-sequence."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, MASK_TOKEN_ID, (batch_size, SEQUENCE_LENGTH), generator=generator)
    if middle_run:
        token_ids[:, 4:6] = MASK_TOKEN_ID
    token_ids[:, -3:] = MASK_TOKEN_ID
    return token_ids


def clean_rows_blind_to_masks(token_ids: torch.Tensor) -> torch.Tensor:
    """A 4-D additive float mask, causal, where clean queries never see MASK keys (as in IC).

    Only then can clean rows be exact: a clean row attending a MASK row would read the
    adapter-changed keys/values of that MASK row.
    """
    length = token_ids.shape[1]
    is_mask = gate_from_token_ids(token_ids, MASK_TOKEN_ID)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (~is_mask[:, None, :] | is_mask[:, :, None])
    blocked_value = torch.finfo(torch.float32).min
    return torch.zeros(allowed.shape).masked_fill(~allowed, blocked_value)[:, None]


def decoder_logits(model: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """The IC trainer's route: inner decoder with a 4-D mask and position ids, then lm_head."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    batch_size, length = token_ids.shape
    hidden = causal_lm.model(
        input_ids=token_ids,
        attention_mask=clean_rows_blind_to_masks(token_ids),
        position_ids=torch.arange(length).expand(batch_size, length),
    ).last_hidden_state
    return causal_lm.lm_head(hidden)


def peft_call_logits(model: PeftModel, token_ids: torch.Tensor) -> torch.Tensor:
    """The same 4-D mask and position ids, through the PeftModel's own forward."""
    batch_size, length = token_ids.shape
    return model(
        input_ids=token_ids,
        attention_mask=clean_rows_blind_to_masks(token_ids),
        position_ids=torch.arange(length).expand(batch_size, length),
    ).logits


def logits_of(model: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_ids).logits


def train_few_steps(model: PeftModel, steps: int = TRAIN_STEPS) -> list[str]:
    """AdamW on CE at MASK positions only; returns the names of parameters that got grads."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    params_with_grads: set[str] = set()
    for step in range(steps):
        token_ids = batch_with_masks(seed=100 + step)
        targets = torch.randint(0, MASK_TOKEN_ID, token_ids.shape, generator=torch.Generator())
        logits = decoder_logits(model, token_ids)
        is_mask = gate_from_token_ids(token_ids, MASK_TOKEN_ID)
        loss = torch.nn.functional.cross_entropy(logits[is_mask], targets[is_mask])
        optimizer.zero_grad()
        loss.backward()
        params_with_grads |= {n for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    model.eval()
    return sorted(params_with_grads)


@pytest.fixture(scope="module")
def trained() -> tuple[PeftModel, Qwen3ForCausalLM, list[str]]:
    reference_base = tiny_base()
    gated = attach_gated_lora(tiny_base(), MASK_TOKEN_ID, rank=8, alpha=16.0, dropout=0.0)
    return gated, reference_base, train_few_steps(gated)


def test_gate_from_token_ids_marks_only_mask_tokens() -> None:
    token_ids = torch.tensor([[5, 127, 9, 127], [127, 0, 1, 2]])
    expected = torch.tensor([[False, True, False, True], [True, False, False, False]])
    assert torch.equal(gate_from_token_ids(token_ids, MASK_TOKEN_ID), expected)


def test_fresh_adapter_equals_base_at_every_position() -> None:
    reference_base = tiny_base()
    gated = attach_gated_lora(tiny_base(), MASK_TOKEN_ID, rank=8, alpha=16.0, dropout=0.0)
    token_ids = batch_with_masks(seed=1)
    assert torch.equal(logits_of(gated, token_ids), logits_of(reference_base, token_ids))
    trainable = [n for n, p in gated.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear: the 7 projections of each of the 2 layers, never lm_head
    assert sum(isinstance(m, GatedLinear) for m in gated.modules()) == 14
    assert not isinstance(gated.get_base_model().lm_head, GatedLinear)


def assert_mask_rows_only_differ(gated: torch.nn.Module, reference_base: torch.nn.Module
                                 ) -> None:
    """Non-MASK rows bit-identical to the base, MASK rows not: by a plain causal call (MASKs
    only at the tail, so no clean row sees one), the IC route and PEFT's own call."""
    tail, ic = batch_with_masks(7, middle_run=False), batch_with_masks(8)
    with torch.no_grad():
        checks = [
            (tail, logits_of(gated, tail), logits_of(reference_base, tail)),
            (ic, decoder_logits(gated, ic), decoder_logits(reference_base, ic)),
            (ic, peft_call_logits(gated, ic), decoder_logits(reference_base, ic)),
        ]
    for token_ids, logits, expected in checks:
        is_mask = gate_from_token_ids(token_ids, MASK_TOKEN_ID)
        assert torch.equal(logits[~is_mask], expected[~is_mask])
        assert (logits[is_mask] - expected[is_mask]).abs().amax() > 1e-3


def test_training_changes_mask_rows_only(trained) -> None:
    gated, reference_base, params_with_grads = trained
    assert_mask_rows_only_differ(gated, reference_base)
    assert params_with_grads and all(".lora_" in name for name in params_with_grads)
    reference_weights = reference_base.state_dict()
    for name, weight in gated.get_base_model().state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(weight, reference_weights[name.replace(".base_layer", "")]), name


def test_gate_is_cleared_after_every_forward(trained) -> None:
    gated, _, _ = trained
    token_gate = find_token_gate(gated)
    logits_of(gated, batch_with_masks(seed=2))
    assert token_gate.current is None
    gated.train()
    decoder_logits(gated, batch_with_masks(seed=2)).sum().backward()
    gated.zero_grad()
    gated.eval()
    assert token_gate.current is None


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant: bool) -> None:
    layer_calls: list[str] = []

    def lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        gated = attach_gated_lora(tiny_base(), MASK_TOKEN_ID, rank=8, alpha=16.0, dropout=0.0)
        for module in gated.modules():
            if isinstance(module, GatedLinear):  # non-zero B so A gets a gradient too
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
        q_proj = gated.get_base_model().model.layers[0].self_attn.q_proj
        q_proj.register_forward_hook(lambda *_: layer_calls.append(str(checkpointing)))
        if checkpointing:
            gated.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": use_reentrant}
            )
            gated.enable_input_require_grads()
        gated.train()
        token_ids = batch_with_masks(seed=3)
        is_mask = gate_from_token_ids(token_ids, MASK_TOKEN_ID)
        decoder_logits(gated, token_ids)[is_mask].sum().backward()
        return {n: p.grad for n, p in gated.named_parameters() if p.grad is not None}

    plain, checkpointed = lora_grads(checkpointing=False), lora_grads(checkpointing=True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 28
    # The checkpointed run replayed the layer in backward, and the replay found its gate.
    assert layer_calls.count("False") == 1 and layer_calls.count("True") == 2
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6)


def test_save_then_load_gives_identical_logits(trained, tmp_path: Path) -> None:
    gated, _, _ = trained
    fingerprint = base_fingerprint(gated, checkpoint_hash="ab" * 32)
    save_gated_lora(gated, tmp_path / "adapter", fingerprint)
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "idlm_gate.json"} <= set(saved)
    gate_record = json.loads((tmp_path / "adapter" / "idlm_gate.json").read_text())
    assert gate_record["mask_token_id"] == MASK_TOKEN_ID
    assert gate_record["base_fingerprint"]["vocab_size"] == VOCAB_SIZE

    loaded = load_gated_lora(tiny_base(), tmp_path / "adapter", base_fingerprint=fingerprint)
    token_ids = batch_with_masks(seed=11)
    assert torch.equal(logits_of(loaded, token_ids), logits_of(gated, token_ids))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_gated_lora(tiny_base(), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"vocab_size": 256}, "vocab_size"), ({"hidden_size": 128, "head_dim": 32}, "hidden_size")],
)
def test_load_into_another_base_fails_clearly(trained, tmp_path: Path, overrides, field) -> None:
    gated, _, _ = trained
    save_gated_lora(gated, tmp_path / "adapter", base_fingerprint(gated))
    with pytest.raises(GatedLoraError, match=f"made for another base model \\({field}"):
        load_gated_lora(tiny_base(**overrides), tmp_path / "adapter")


def test_load_with_another_checkpoint_hash_fails(trained, tmp_path: Path) -> None:
    gated, _, _ = trained
    save_gated_lora(gated, tmp_path / "adapter", base_fingerprint(gated, checkpoint_hash="a" * 64))
    other = tiny_base()
    with pytest.raises(GatedLoraError, match="checkpoint_sha256"):
        load_gated_lora(other, tmp_path / "adapter", base_fingerprint(other, "b" * 64))


def test_missing_or_corrupt_adapter_fails_clearly(trained, tmp_path: Path) -> None:
    gated, _, _ = trained
    with pytest.raises(GatedLoraError, match="not found"):
        load_gated_lora(tiny_base(), tmp_path / "nowhere")
    adapter_dir = save_gated_lora(gated, tmp_path / "adapter", base_fingerprint(gated))
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(GatedLoraError, match="adapter_model.safetensors is corrupt"):
        load_gated_lora(tiny_base(), adapter_dir)
    (adapter_dir / "idlm_gate.json").write_text("{not json")
    with pytest.raises(GatedLoraError, match="idlm_gate.json is corrupt"):
        load_gated_lora(tiny_base(), adapter_dir)
    weights.unlink()
    with pytest.raises(GatedLoraError, match="missing adapter_model.safetensors"):
        load_gated_lora(tiny_base(), adapter_dir)


def test_merging_is_refused() -> None:
    gated = attach_gated_lora(tiny_base(), MASK_TOKEN_ID, rank=4, alpha=8.0, dropout=0.0)
    with pytest.raises(GatedLoraError, match="cannot be merged"):
        gated.merge_and_unload()
    with pytest.raises(GatedLoraError, match="cannot be merged"):
        gated.merge_adapter()


def test_inputs_embeds_need_an_explicit_gate(trained) -> None:
    gated, _, _ = trained
    token_ids = batch_with_masks(seed=5)
    inputs_embeds = gated.get_input_embeddings()(token_ids).detach()
    with pytest.raises(GatedLoraError, match="explicit_gate"):
        gated(inputs_embeds=inputs_embeds)
    gate = gate_from_token_ids(token_ids, MASK_TOKEN_ID)
    with torch.no_grad(), explicit_gate(gated, gate):
        from_embeds = gated(inputs_embeds=inputs_embeds).logits
    assert torch.equal(from_embeds, logits_of(gated, token_ids))
    with pytest.raises(GatedLoraError, match="explicit gate has shape"):
        with explicit_gate(gated, gate[:, :4]):
            gated(inputs_embeds=inputs_embeds)
    assert find_token_gate(gated).explicit is None


DEEPSPEED_SCRIPT = """
import os, sys, torch
os.environ["DS_ACCELERATOR"] = "cpu"
import deepspeed
sys.path.insert(0, sys.argv[1])
from test_gated_lora import *
from idlm.training import distributed
reference = tiny_base()
gated = attach_gated_lora(tiny_base(), MASK_TOKEN_ID, rank=8, alpha=16.0, dropout=0.0,
                          mask_embedding=True)
# The trainer's own start: a world of one over gloo, without DeepSpeed's shm op (whose
# JIT compile made this the slowest unit test: 53 s on CI).
distributed.init("cpu")
config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
trainable = [p for p in gated.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=gated, model_parameters=trainable, config=config)
for step in range(3):
    token_ids = batch_with_masks(100 + step)
    is_mask = gate_from_token_ids(token_ids, MASK_TOKEN_ID)
    logits = decoder_logits(engine.module, token_ids)
    engine.backward(torch.nn.functional.cross_entropy(logits[is_mask], token_ids[is_mask] * 0))
    engine.step()
engine.eval()
tail = batch_with_masks(7, middle_run=False)
is_mask = gate_from_token_ids(tail, MASK_TOKEN_ID)
with torch.no_grad():
    trained_logits, base_logits = engine(input_ids=tail).logits, reference(input_ids=tail).logits
assert torch.equal(trained_logits[~is_mask], base_logits[~is_mask])
assert (trained_logits[is_mask] - base_logits[is_mask]).abs().amax() > 1e-3
assert find_token_gate(engine.module).mask_embedding.delta.abs().amax() > 0  # DeepSpeed trained it
print("DEEPSPEED_OK")
"""


@pytest.mark.slow
def test_trains_inside_a_deepspeed_engine() -> None:
    """ZeRO-0 on CPU over gloo; a subprocess keeps the process group out of this process."""
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_SCRIPT, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "DEEPSPEED_OK" in completed.stdout, completed.stderr[-3000:]
