"""Data for every profile: the tiny corpus, tokenizers, SFT datasets, the prepare stage."""
