"""One DeepSpeed-engine trainer shared by the base, ic and lora stages."""
