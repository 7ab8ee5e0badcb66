"""Model construction, hub resolution, the MASK token and the gated-LoRA adapter."""
