"""DVC stage `prepare`.

Generate (tiny) or load (real) the SFT data, build the tokenizer, tokenize and shard into
outputs/prepare/ (see idlm.data.prepare).
"""

from idlm.stage import exit_process, stage_main


def _run(cfg):  # noqa: ANN001, ANN202 - heavy imports only after the config is valid
    from idlm.data.prepare import run

    return run(cfg)


if __name__ == "__main__":
    exit_process(stage_main("prepare", _run, __doc__))
