"""DVC stage `prepare`.

Generate (tiny) or load (real) the SFT data, build the tokenizer, tokenize and shard into
outputs/prepare/ (see idlm.data.prepare).
"""

from idlm.stage import exit_process, stage_main

if __name__ == "__main__":   # runs idlm.stages.prepare.run once the config is valid
    exit_process(stage_main("prepare", __doc__))
