"""Where a gated-LoRA model keeps its token gate: an attribute of its decoder.

Imports nothing, so the decoding engine can ask whether a model is gated without
importing peft (``gated_lora`` installs the gate; everything else only looks it up here).
"""

from __future__ import annotations

from typing import Any

GATE_ATTRIBUTE = "idlm_token_gate"


def token_gate_of(module: Any) -> Any | None:
    """The ``gated_lora.TokenGate`` this module holds, or None (not the gated decoder)."""
    return getattr(module, GATE_ATTRIBUTE, None)
