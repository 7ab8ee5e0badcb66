"""ISD: introspective strided decoding on an introspective-consistency (IC) model.

Each forward verifies the last step's N-1 drafts against the AR rows of the window and
drafts N-1 more from its MASK slots by sampling q; accepted drafts plus one bonus or
replacement token are emitted, so the output follows the AR law exactly.
"""

from idlm.decoding.algorithms.base import Algorithm

ALGORITHM = Algorithm(
    name="isd", summary="introspective strided decoding: verify N-1 drafts, draft N-1 more",
    mode="isd", drafts=True, gated=False, proposal="sample")
