"""The pipeline's stages, one module per ``dvc.yaml`` stage and named as it is there; each
has ``run(cfg) -> metrics``. ``stages/<name>.py`` (what DVC runs) validates the config and
calls it (:func:`idlm.stage.stage_main`). The library code they call lives in the domain
packages (``data``, ``training``, ``decoding``, ``benchmarks``, ``serving``).
"""
