"""The three systems the project compares, named once: ``ar`` (the base model, one token
per forward), ``isd`` (the I-DLM with introspective strided decoding) and ``risd`` (the
base model plus the gated LoRA, lossless against ``ar``)."""

from __future__ import annotations

from typing import Literal, get_args

System = Literal["ar", "isd", "risd"]
SYSTEMS: tuple[System, ...] = get_args(System)
