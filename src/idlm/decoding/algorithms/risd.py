"""R-ISD: ISD on the base model carrying a gated LoRA that is on only at the MASK slots.

The same window and verification as ISD; the engine (and the SGLang plugin) opens the
adapter at the MASK slots it placed (``base.gate``), so the AR rows are the untouched base
model and the output is the base model's AR law.
"""

from idlm.decoding.algorithms.base import Algorithm

ALGORITHM = Algorithm(
    name="risd", summary="ISD on the base model with a gated LoRA open only at MASK slots",
    mode="isd", drafts=True, gated=True, proposal="sample")
