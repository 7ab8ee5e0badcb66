"""What a decoding algorithm is: a name, a one-line summary and the few facts the engine
and the SGLang window read from it.

The math is shared, pure and lives elsewhere: ``bookkeeping`` lays out the window,
``acceptance.verify_step`` verifies it (greedy, or sampled with per-row argmax flags) for
the engine and the SGLang plugin alike. An algorithm only says which of those rules a
request gets: whether it drafts from MASK slots (and so how many slots a stride gives),
which proposal rule reads a draft from q, and whether the gated adapter opens.

Torch-free on purpose: ``idlm generate --help`` lists the registry's names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from idlm.decoding.bookkeeping import Window

MAX_STRIDE = 16           # the widest ISD window the engine (and its RNG slots) supports
DEFAULT_PROPOSAL = "sample"


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm (``ALGORITHM`` in its own module, named like the module).

    ``gated``: True opens the gated adapter at the MASK slots (R-ISD: needs a gated model);
    False opens none (ISD on a model without one, or AR, which has no MASK slots); None
    follows the model (a proposal variant that composes with both ISD and R-ISD).
    """

    name: str
    summary: str
    mode: str                # the ``GenerationRequest.mode`` that asks for it
    drafts: bool             # N-1 drafts from MASK slots per forward (else one token)
    gated: bool | None
    proposal: str | None     # how a draft is read from q ("sample", "argmax"); None: no drafts

    def num_drafts(self, stride: int) -> int:
        """MASK slots per window: N-1 when drafting, none for AR."""
        return stride - 1 if self.drafts else 0

    def stride_error(self, stride: int) -> str | None:
        """Why ``stride`` cannot run (one line), or None; AR ignores the stride."""
        if self.drafts and not 2 <= stride <= MAX_STRIDE:
            return (f"stride N={stride} is invalid for {self.mode.upper()}: "
                    f"use 2 <= N <= {MAX_STRIDE}")
        return None

    @property
    def argmax_proposal(self) -> bool:
        """The row flag of ``verify_sampled``: drafts are argmax q, verified as one-hot q."""
        return self.proposal == "argmax"

    @property
    def system(self) -> bool:
        """Tied to one kind of model (what ``load_engine`` and ``--mode`` take), not a
        variant that runs on whichever model is loaded."""
        return self.gated is not None

    def serves(self, mode: str, proposal: str, gated: bool) -> bool:
        """Whether this algorithm runs a request of ``mode`` / ``proposal`` on a model with
        (``gated``) or without the gated adapter."""
        if mode != self.mode:
            return False
        if not self.drafts:      # nothing is proposed and no MASK slot opens a gate
            return True
        return proposal == self.proposal and self.gated in (None, gated)


def gate(window: Window) -> torch.Tensor:
    """The gated adapter's rule, the same for every algorithm: open at exactly the MASK slots
    the window placed (``drafting``), shut everywhere else, including a MASK id that occurs
    in the context as an ordinary token (AR would read it as one, so R-ISD must too). AR
    places no MASK slot, so its rows stay shut; a model without the adapter ignores it."""
    return window.drafting
