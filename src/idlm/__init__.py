"""idlm: train, verify, evaluate, export and gate Introspective Diffusion Language Models."""

__version__ = "0.1.0"
