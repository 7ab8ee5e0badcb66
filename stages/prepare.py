"""DVC stage ``prepare``: tokenizer + tokenized train/eval splits (see idlm.data.prepare)."""

from __future__ import annotations

import sys

from idlm.data.prepare import run
from idlm.stage import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("prepare", run, "Generate (tiny) or load (real) the SFT data, build the "
                      "tokenizer, tokenize and shard into outputs/prepare/.", argv)


if __name__ == "__main__":
    sys.exit(main())
