"""The IC layout, its attention mask and loss, checked against the rules of docs/method.md."""

from __future__ import annotations

import itertools

import pytest
import torch

from idlm import objective
from idlm.objective import CLEAN, IGNORE, MASKED, PAD
from tests.conftest import MASK_ID, PAD_ID


def _random_rows(generator: torch.Generator, lengths: list[int], prompts: list[int]):
    return [torch.randint(1, MASK_ID, (n,), generator=generator).tolist() for n in lengths]


def brute_force_2l(length: int, prompt: int, block_size: int, offset: int) -> torch.Tensor:
    """The rules (docs/method.md) on the full 2L layout [x_t | x_0] (x_t first), by loops.

    Blocks are laid over the response (the prompt is clean in x_t and never a MASK).
    """
    size = 2 * length
    mask = torch.zeros(size, size, dtype=torch.bool)

    def block_of(pos: int) -> int:
        return (pos - prompt + offset) // block_size if pos >= prompt else -1

    def block_start(pos: int) -> int:
        return max(prompt, prompt + block_of(pos) * block_size - offset)

    for q, k in itertools.product(range(size), repeat=2):
        q_clean, k_clean = q >= length, k >= length
        qp, kp = q % length, k % length
        if q_clean:
            mask[q, k] = k_clean and kp <= qp
        elif qp >= prompt:  # a MASK query in x_t
            if k_clean:
                mask[q, k] = kp < block_start(qp)
            else:
                mask[q, k] = kp >= prompt and block_of(kp) == block_of(qp) and kp <= qp
    return mask


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_mask_matches_brute_force(stride: int) -> None:
    generator = torch.Generator().manual_seed(stride)
    lengths, prompts = [9, 14, 6], [3, 5, 2]
    offsets = [1 % (stride - 1), 0, (stride - 2)]
    batch = objective.build_ic_batch(_random_rows(generator, lengths, prompts), prompts, stride,
                                     MASK_ID, PAD_ID, offsets)
    dense = objective.dense_mask(batch)[:, 0]
    for row, (length, prompt, offset) in enumerate(zip(lengths, prompts, offsets, strict=True)):
        reference = brute_force_2l(length, prompt, stride - 1, offset)
        # compact index -> 2L index: clean i -> L + i; MASK at position j -> j.
        compact = list(range(length, 2 * length)) + list(range(prompt, length))
        expected = reference[compact][:, compact]
        used = len(compact)
        assert torch.equal(dense[row, :used, :used], expected)
        # Padding rows see only themselves; nothing attends padding.
        width = dense.shape[-1]
        for pad in range(used, width):
            assert dense[row, pad].nonzero().flatten().tolist() == [pad]
            assert not dense[row, :used, pad].any()
        # Why the x_t prompt half may be left out: no MASK query ever attends it.
        assert not reference[prompt:length, :prompt].any()


def test_layout_labels_and_positions() -> None:
    seq, prompt = [5, 6, 7, 8, 9, 10], 2
    batch = objective.build_ic_batch([seq], [prompt], 3, MASK_ID, PAD_ID, [1])
    assert batch.input_ids[0].tolist() == seq + [MASK_ID] * 4
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
    assert batch.kind[0].tolist() == [CLEAN] * 6 + [MASKED] * 4
    # clean i -> x[i+1] on response targets; MASK at j -> x[j+1]; last MASK has none.
    assert batch.labels[0].tolist() == [IGNORE, 7, 8, 9, 10, IGNORE, 8, 9, 10, IGNORE]
    # B=2, offset 1: blocks {2}, {3,4}, {5}.
    assert batch.block[0, 6:].tolist() == [0, 1, 1, 2]
    assert batch.block_start[0, 6:].tolist() == [2, 3, 3, 5]
    assert batch.response_tokens == 4
    assert PAD == 0


@pytest.mark.parametrize("stride", [3, 4])
def test_a_mask_half_per_offset_equals_one_layout_per_offset(model, stride: int) -> None:
    """``[x_0 | MASK x R | MASK x R ...]``: each half's rows, mask and logits are those of
    the one-offset layout at that offset (the halves never see each other)."""
    generator = torch.Generator().manual_seed(stride)
    lengths, prompts = [11, 7], [4, 3]
    rows = _random_rows(generator, lengths, prompts)
    offsets = tuple(range(stride - 1))
    joint = objective.build_ic_batch(rows, prompts, stride, MASK_ID, PAD_ID,
                                     [offsets] * len(rows))
    with torch.no_grad():
        joint_logits = objective.ic_logits(model, joint)
    joint_mask = objective.dense_mask(joint)[:, 0]
    responses = sum(n - p for n, p in zip(lengths, prompts, strict=True))
    assert joint.response_tokens == responses * len(offsets)
    for offset in offsets:
        alone = objective.build_ic_batch(rows, prompts, stride, MASK_ID, PAD_ID,
                                         [offset] * len(rows))
        with torch.no_grad():
            alone_logits = objective.ic_logits(model, alone)
        alone_mask = objective.dense_mask(alone)[:, 0]
        for row, (length, prompt) in enumerate(zip(lengths, prompts, strict=True)):
            response = length - prompt
            half = list(range(length)) + list(
                range(length + offset * response, length + (offset + 1) * response))
            mine = list(range(length + response))
            for name in ("input_ids", "position_ids", "kind", "block_start", "labels"):
                assert getattr(joint, name)[row, half].tolist() == \
                    getattr(alone, name)[row, mine].tolist(), name
            assert torch.equal(joint_mask[row][half][:, half], alone_mask[row][mine][:, mine])
            torch.testing.assert_close(joint_logits[row, half], alone_logits[row, mine],
                                       atol=1e-5, rtol=0)


def test_clean_logits_equal_plain_causal_forward(model) -> None:
    generator = torch.Generator().manual_seed(0)
    lengths, prompts = [12, 7, 10], [4, 3, 5]
    rows = _random_rows(generator, lengths, prompts)
    for stride in (2, 3, 4):
        batch = objective.build_ic_batch(rows, prompts, stride, MASK_ID, PAD_ID, [0, 1, 2])
        with torch.no_grad():
            logits = objective.ic_logits(model, batch)
            for row, seq in enumerate(rows):
                plain = model(input_ids=torch.tensor([seq])).logits[0]
                torch.testing.assert_close(logits[row, :len(seq)], plain, atol=1e-5, rtol=0)


def test_mask_query_cannot_see_the_future(model) -> None:
    generator = torch.Generator().manual_seed(1)
    seq, prompt, stride = _random_rows(generator, [14], [4])[0], 4, 4
    batch = objective.build_ic_batch([seq], [prompt], stride, MASK_ID, PAD_ID, [2])
    with torch.no_grad():
        base = objective.ic_logits(model, batch)[0]
    length = len(seq)
    for row in range(length, 2 * length - prompt):
        start = int(batch.block_start[0, row])
        for changed in (start, length - 1, start - 1):
            if changed < 0:
                continue
            edited = list(seq)
            edited[changed] = (edited[changed] % (MASK_ID - 2)) + 1
            batch2 = objective.build_ic_batch([edited], [prompt], stride, MASK_ID, PAD_ID, [2])
            with torch.no_grad():
                after = objective.ic_logits(model, batch2)[0, row]
            same = torch.allclose(after, base[row], atol=1e-6, rtol=0)
            assert same == (changed >= start), (row, changed, start)


def test_auto_balance_makes_terms_equal(model) -> None:
    generator = torch.Generator().manual_seed(2)
    rows = _random_rows(generator, [12, 9], [4, 3])
    batch = objective.build_ic_batch(rows, [4, 3], 3, MASK_ID, PAD_ID)
    loss = objective.ic_loss(model, batch, "auto")
    torch.testing.assert_close(loss.alpha * loss.clean_ce, loss.mask_ce)
    torch.testing.assert_close(loss.total.detach(), 2 * loss.mask_ce)
    fixed = objective.ic_loss(model, batch, 0.2)
    assert fixed.alpha == 0.2
    torch.testing.assert_close(fixed.total.detach(), fixed.mask_ce + 0.2 * fixed.clean_ce)


def test_losses_take_the_head_in_whole_buckets_and_equal_the_exact_rows(model) -> None:
    """The LM head sees a bucketed row count (one oneDNN primitive per bucket, not one per
    step), and the padding rows change neither loss."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(3)
    rows = _random_rows(generator, [12, 9, 15], [4, 3, 5])
    head = model.get_output_embeddings()
    seen: list[int] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            clean = objective.build_ic_batch(rows, [4, 3, 5], None, MASK_ID, PAD_ID)
            loss = objective.clean_loss(model, clean)
            ic = objective.build_ic_batch(rows, [4, 3, 5], 3, MASK_ID, PAD_ID)
            ic_terms = objective.ic_loss(model, ic, 0.5)
    finally:
        hook.remove()
    assert seen and all(n % objective.HEAD_ROW_BUCKET == 0 for n in seen), seen

    def exact(batch, kind, reduction="mean"):  # noqa: ANN001, ANN202
        hidden = objective.hidden_states(model, batch, "sdpa", torch.float32)
        picked = (batch.kind == kind) & (batch.labels != IGNORE)
        return F.cross_entropy(head(hidden[picked]).float(), batch.labels[picked],
                               reduction=reduction)

    with torch.no_grad():
        torch.testing.assert_close(loss, exact(clean, CLEAN), atol=1e-5, rtol=0)
        torch.testing.assert_close(ic_terms.clean_ce, exact(ic, CLEAN), atol=1e-5, rtol=0)
        torch.testing.assert_close(ic_terms.mask_ce, exact(ic, MASKED, "sum")
                                   / ic.response_tokens, atol=1e-5, rtol=0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="stride"):
        objective.build_ic_batch([[1, 2, 3]], [1], 1, MASK_ID, PAD_ID)
    with pytest.raises(ValueError, match="prompt length"):
        objective.build_ic_batch([[1, 2, 3]], [3], 2, MASK_ID, PAD_ID)
