"""Introspective-consistency (IC) training: layout, attention mask, logit shift, loss.

Layout per sample, docs/method.md's ``[x_t | x_0]`` without x_t's prompt half (MASK blocks
only ever see the *clean* prefix, so that half is never attended; leaving it out gives
the same loss and gradients on L + R tokens instead of 2L)::

    index:     0 .. L-1            L .. L+R-1           (padding)
    tokens:    x_0 (clean)         MASK x R             pad
    positions: 0 .. L-1            r0 .. L-1            0
    kind:      CLEAN               MASKED               PAD

Response positions r0..L-1 are cut into blocks of B = N-1 positions, shifted by a
per-sample offset in [0, B) so that every response token is trained at every slot of a
block. Attention (token-level, strictly causal everywhere):

* clean query -> clean keys at positions <= its own (plain AR);
* MASK query in block b -> clean keys before the block's first position, and MASK keys
  of block b at positions <= its own;
* padding query -> itself only (a fully masked row makes SDPA return NaN).

Logit shift: the hidden state at position i predicts the token at i+1, so the last clean
token predicts the next (AR) token and each MASK drafts one token further.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD, CLEAN, MASKED = 0, 1, 2
IGNORE = -100


@dataclass
class ICBatch:
    """Tensors of one IC batch; all [batch, seq] unless noted."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    kind: torch.Tensor          # PAD / CLEAN / MASKED per row
    block: torch.Tensor         # block id of MASK rows (-1 elsewhere)
    block_start: torch.Tensor   # first position of a MASK row's block (0 elsewhere)
    labels: torch.Tensor        # shifted targets, IGNORE where no loss
    response_tokens: int        # number of response tokens in the batch (loss normaliser)
    segment: torch.Tensor       # which packed sequence of its row a token belongs to (-1: pad)

    def to(self, device: torch.device | str) -> ICBatch:
        fields = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return ICBatch(**fields)


def block_layout(prompt_length: int, length: int, block_size: int, offset: int
                 ) -> tuple[list[int], list[int]]:
    """Block id and block start position for each response position r0..L-1."""
    blocks, starts = [], []
    for pos in range(prompt_length, length):
        blk = (pos - prompt_length + offset) // block_size
        blocks.append(blk)
        starts.append(max(prompt_length, prompt_length + blk * block_size - offset))
    return blocks, starts


def build_ic_batch(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                   stride: int | None, mask_token_id: int, pad_token_id: int,
                   offsets: Sequence[int | Sequence[int]] | None = None,
                   pack_width: int | None = None) -> ICBatch:
    """Lay out ``[x_0 | MASK x R]`` segments with labels for stride N (B = N-1).

    ``stride=None`` lays out ``x_0`` alone (the AR loss of the base stage). Without
    ``pack_width`` each sequence has a row of its own; with it, sequences are packed
    first-fit-decreasing into rows of that width (a longer one gets a row to itself), and
    attention never crosses from one sequence to another, so the loss is the unpacked one
    at ~60% fewer padded tokens.

    An offset may be a tuple: the sequence then gets one MASK half per offset after its one
    ``x_0`` (``[x_0 | MASK x R | MASK x R ...]``, each half in blocks of its own that see
    only ``x_0``), which is the single-offset layouts' rows at less than their cost (the
    teacher-forced introspection scores every offset of a sequence this way).
    """
    if stride is not None and stride < 2:
        raise ValueError(f"stride must be >= 2 (got {stride})")
    offsets = offsets if offsets is not None else [0] * len(sequences)
    copies = [tuple(o) if isinstance(o, Sequence) else (o,) for o in offsets]
    for row, (seq, r0) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        if not 0 < r0 < len(seq):
            raise ValueError(f"row {row}: prompt length {r0} must be in (0, {len(seq)})")
    widths = [len(seq) if stride is None else len(seq) + len(c) * (len(seq) - p)
              for seq, p, c in zip(sequences, prompt_lengths, copies, strict=True)]
    placement, width = pack_segments(widths, pack_width)
    shape = (max(row for row, _ in placement) + 1, width)
    batch = ICBatch(torch.full(shape, pad_token_id, dtype=torch.long),
                    torch.zeros(shape, dtype=torch.long), torch.full(shape, PAD, dtype=torch.long),
                    torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.long),
                    torch.full(shape, IGNORE, dtype=torch.long), 0,
                    torch.full(shape, -1, dtype=torch.long))
    for index, (row, start) in enumerate(placement):
        batch.response_tokens += _place(batch, row, start, index, sequences[index],
                                        prompt_lengths[index], stride, copies[index],
                                        mask_token_id)
    return batch


def pack_segments(widths: Sequence[int], pack_width: int | None
                  ) -> tuple[list[tuple[int, int]], int]:
    """(row, start column) of each segment, and the row width: first-fit decreasing."""
    if pack_width is None:
        return [(index, 0) for index in range(len(widths))], max(widths)
    width = max(pack_width, max(widths))
    used: list[int] = []
    placement = [(0, 0)] * len(widths)
    for index in sorted(range(len(widths)), key=lambda i: (-widths[i], i)):
        row = next((r for r, fill in enumerate(used) if fill + widths[index] <= width), None)
        if row is None:
            row = len(used)
            used.append(0)
        placement[index] = (row, used[row])
        used[row] += widths[index]
    return placement, width


def _place(batch: ICBatch, row: int, start: int, segment: int, seq: Sequence[int], r0: int,
           stride: int | None, offsets: tuple[int, ...], mask_token_id: int) -> int:
    """Write one sequence's segment at ``start`` of ``row`` (one MASK half per offset);
    returns its response length (times the MASK halves)."""
    length = len(seq)
    tokens = torch.as_tensor(seq, dtype=torch.long)
    response = length - r0
    clean = slice(start, start + length)
    batch.input_ids[row, clean] = tokens
    batch.position_ids[row, clean] = torch.arange(length)
    batch.kind[row, clean] = CLEAN
    # Clean row i predicts x[i+1]; only response targets count (the AR SFT loss).
    batch.labels[row, start + r0 - 1:start + length - 1] = tokens[r0:]
    if stride is None:
        batch.segment[row, clean] = segment
        return response
    batch.segment[row, start:start + length + len(offsets) * response] = segment
    block_size = stride - 1
    for copy, offset in enumerate(offsets):
        first = start + length + copy * response
        masked = slice(first, first + response)
        batch.input_ids[row, masked] = mask_token_id
        batch.position_ids[row, masked] = torch.arange(r0, length)
        batch.kind[row, masked] = MASKED
        blocks, starts = block_layout(r0, length, block_size, offset % block_size)
        # Block ids of one half never equal another's: halves do not see each other.
        batch.block[row, masked] = torch.as_tensor(blocks) + copy * (response + 1)
        batch.block_start[row, masked] = torch.as_tensor(starts)
        # MASK at position j drafts x[j+1]; the last one has nothing left to draft.
        batch.labels[row, first:first + response - 1] = tokens[r0 + 1:]
    return response * len(offsets)


def allowed(kind_q: torch.Tensor, pos_q: torch.Tensor, block_q: torch.Tensor,
            start_q: torch.Tensor, kind_k: torch.Tensor, pos_k: torch.Tensor,
            block_k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
            seg_q: torch.Tensor, seg_k: torch.Tensor) -> torch.Tensor:
    """The IC attention rule on broadcastable tensors: one definition for SDPA and flex.
    Nothing crosses between packed sequences (``seg``)."""
    same = seg_q == seg_k
    clean_q, masked_q, pad_q = kind_q == CLEAN, kind_q == MASKED, kind_q == PAD
    clean_k, masked_k = (kind_k == CLEAN) & same, (kind_k == MASKED) & same
    ar = clean_q & clean_k & (pos_k <= pos_q)
    prefix = masked_q & clean_k & (pos_k < start_q)
    own_block = masked_q & masked_k & (block_k == block_q) & (pos_k <= pos_q)
    return ar | prefix | own_block | (pad_q & (q_idx == k_idx))


def dense_mask(batch: ICBatch) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq] mask (True = may attend), for SDPA on CPU."""
    idx = torch.arange(batch.kind.shape[1], device=batch.kind.device)
    q = {k: v[:, :, None] for k, v in _rows(batch).items()}
    k = {k: v[:, None, :] for k, v in _rows(batch).items()}
    grid = allowed(q["kind"], q["pos"], q["block"], q["start"], k["kind"], k["pos"], k["block"],
                   idx[:, None], idx[None, :], q["seg"], k["seg"])
    return grid[:, None]


def additive_mask(batch: ICBatch, dtype: torch.dtype) -> torch.Tensor:
    """Float 0 / -inf-like mask: what transformers' eager and SDPA paths both accept."""
    mask = dense_mask(batch)
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)


def flex_block_mask(batch: ICBatch):  # -> torch.nn.attention.flex_attention.BlockMask
    """The same rule as a flex_attention BlockMask: never materialises seq x seq on GPU."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows = _rows(batch)

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - flex passes index tensors
        return allowed(rows["kind"][b, q_idx], rows["pos"][b, q_idx], rows["block"][b, q_idx],
                       rows["start"][b, q_idx], rows["kind"][b, kv_idx], rows["pos"][b, kv_idx],
                       rows["block"][b, kv_idx], q_idx, kv_idx, rows["seg"][b, q_idx],
                       rows["seg"][b, kv_idx])

    size = batch.kind.shape[1]
    return create_block_mask(mask_mod, batch.kind.shape[0], None, size, size,
                             device=batch.kind.device)


def _rows(batch: ICBatch) -> dict[str, torch.Tensor]:
    return {"kind": batch.kind, "pos": batch.position_ids, "block": batch.block,
            "start": batch.block_start, "seg": batch.segment}


def attention_mask_for(batch: ICBatch, implementation: str, dtype: torch.dtype):
    if implementation == "flex_attention":
        return flex_block_mask(batch)
    return additive_mask(batch, dtype)


def hidden_states(model: torch.nn.Module, batch: ICBatch, implementation: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """Final hidden states of the IC layout (decoder only; the LM head is applied later)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids,
                  attention_mask=attention_mask_for(batch, implementation, dtype),
                  use_cache=False)
    return out.last_hidden_state


# The LM head's row count in the losses is rounded up to a multiple of this (zero rows
# with IGNORE targets, which add nothing to a sum or a mean). Under bf16 autocast on CPU
# every new matmul shape is a new oneDNN primitive, kept in its cache (1024 of them,
# each with its JIT code): with the exact count of target rows, new every step, a tiny
# bf16 run grew by ~3 MiB a step (0.8 to 2.5 GiB in 300 steps; fp32 stayed at 1 GiB).
HEAD_ROW_BUCKET = 256


def selected_logits(head: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits and targets of the ``rows`` of ``hidden``, padded to a whole bucket."""
    selected, targets = hidden[rows], labels[rows]
    pad = -selected.shape[0] % HEAD_ROW_BUCKET
    if pad:
        selected = torch.cat([selected, selected.new_zeros(pad, selected.shape[1])])
        targets = torch.cat([targets, targets.new_full((pad,), IGNORE)])
    return head(selected).float(), targets


def ic_logits(model: torch.nn.Module, batch: ICBatch, implementation: str = "sdpa",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits at every row of the IC layout (tests, diagnostics; training avoids this)."""
    return model.get_output_embeddings()(hidden_states(model, batch, implementation, dtype))


@dataclass
class ICLoss:
    total: torch.Tensor
    mask_ce: torch.Tensor
    clean_ce: torch.Tensor
    alpha: float


def balance_alpha(mask_ce: torch.Tensor, clean_ce: torch.Tensor, alpha: float | str,
                  alpha_max: float | None = None) -> float:
    """Fixed alpha, or ``auto``: alpha = L_mask / L_clean (detached), so both terms are equal,
    capped at ``alpha_max`` when given."""
    if alpha == "auto":
        balanced = float(mask_ce.detach() / (clean_ce.detach() + 1e-8))
        return balanced if alpha_max is None else min(balanced, alpha_max)
    return float(alpha)


def ic_loss(model: torch.nn.Module, batch: ICBatch, alpha: float | str,
            implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
            alpha_max: float | None = None) -> ICLoss:
    """CE over MASK rows (/ response tokens) + alpha * CE over clean response targets."""
    hidden = hidden_states(model, batch, implementation, dtype)
    head = model.get_output_embeddings()
    masked_rows = (batch.kind == MASKED) & (batch.labels != IGNORE)
    clean_rows = (batch.kind == CLEAN) & (batch.labels != IGNORE)
    mask_logits, mask_targets = selected_logits(head, hidden, masked_rows, batch.labels)
    clean_logits, clean_targets = selected_logits(head, hidden, clean_rows, batch.labels)
    mask_ce = F.cross_entropy(mask_logits, mask_targets, ignore_index=IGNORE, reduction="sum")
    mask_ce = mask_ce / max(batch.response_tokens, 1)
    clean_ce = F.cross_entropy(clean_logits, clean_targets, ignore_index=IGNORE)
    weight = balance_alpha(mask_ce, clean_ce, alpha, alpha_max)
    return ICLoss(mask_ce + weight * clean_ce, mask_ce.detach(), clean_ce.detach(), weight)


def clean_loss(model: torch.nn.Module, batch: ICBatch, implementation: str = "sdpa",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The AR SFT loss on a (packed) ``stride=None`` layout: mean CE over response targets."""
    hidden = hidden_states(model, batch, implementation, dtype)
    rows = (batch.kind == CLEAN) & (batch.labels != IGNORE)
    logits, targets = selected_logits(model.get_output_embeddings(), hidden, rows, batch.labels)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE)


def ar_loss(model: torch.nn.Module, sequences: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain AR SFT loss (the base stage): labels already shifted, IGNORE where no loss."""
    hidden = model.get_decoder()(input_ids=sequences, use_cache=False).last_hidden_state
    rows = labels != IGNORE
    logits = model.get_output_embeddings()(hidden[rows]).float()
    return F.cross_entropy(logits, labels[rows])
