"""AR: one token per forward from the model's own distribution (the reference law).

Runs on any model: with no MASK slot in its window a gated adapter never opens, so a
gated model decodes AR with its base weights, and ISD / R-ISD must match this output.
"""

from idlm.decoding.algorithms.base import Algorithm

ALGORITHM = Algorithm(
    name="ar", summary="autoregressive: one token per forward (the reference law)",
    mode="ar", drafts=False, gated=False, proposal=None)
