"""Serving, one subpackage per job: ``http`` (``idlm serve``, the OpenAI-compatible server),
``export`` (the export stage: SGLang bundles and the registry), ``gate`` (the gate stage:
the load test and the promotion) and ``sglang`` (the plugin SGLang loads)."""
