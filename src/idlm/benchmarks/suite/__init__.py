"""One module per benchmark; each registers its class with ``idlm.benchmarks.registry``."""
