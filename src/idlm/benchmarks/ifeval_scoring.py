"""IFEval: lm-eval's copy of Google's instruction checks, made to work offline.

lm-eval's ``instructions_util`` tries to download nltk's ``punkt_tab`` at import and needs
punkt for two things: sentence counting and ``nltk.word_tokenize`` (capital-word
frequency). Neither can be downloaded here, so at import we skip the download and route
both to tokenizers that need no data: IFEval's own regex ``split_into_sentences`` and
nltk's Treebank word tokenizer (``word_tokenize(..., preserve_line=True)``).
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any

from idlm.benchmarks.answers import final_answer_rule, strip_thinking
from idlm.benchmarks.base import Verdict


class _OfflineSentenceSplitter:
    def __init__(self, split: Any) -> None:
        self._split = split

    def tokenize(self, text: str) -> list[str]:
        return self._split(text)


class _OfflineNltk:
    """The ``nltk`` module as instructions_util sees it, with a punkt-free word_tokenize."""

    def __init__(self, nltk: ModuleType) -> None:
        self._nltk = nltk

    def word_tokenize(self, text: str, language: str = "english") -> list[str]:
        return self._nltk.word_tokenize(text, language=language, preserve_line=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nltk, name)


@lru_cache(maxsize=1)
def ifeval_utils() -> ModuleType:
    """lm-eval's ``tasks.ifeval.utils`` with the offline tokenizers installed."""
    import contextlib
    import io

    import langdetect
    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False  # no network: do not even try
    try:  # lm-eval prints a download message at import; keep stdout clean
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_util, utils
    finally:
        nltk.download = download
    splitter = _OfflineSentenceSplitter(instructions_util.split_into_sentences)
    instructions_util._get_sentence_tokenizer = lambda: splitter
    instructions_util.nltk = _OfflineNltk(nltk)
    langdetect.DetectorFactory.seed = 0  # language checks must not vary run to run
    return utils


def ifeval_verdict(output: str, prompt: str, instruction_ids: list[str],
                   kwargs: list[dict[str, Any]]) -> Verdict:
    """Prompt-level strict accuracy (IFEval's headline); loose and per-instruction results
    go into the detail."""
    utils = ifeval_utils()
    response = strip_thinking(output)
    example = utils.InputExample(key=0, instruction_id_list=list(instruction_ids),
                                 prompt=prompt, kwargs=[dict(k or {}) for k in kwargs])
    strict = utils.test_instruction_following_strict(example, response)
    loose = utils.test_instruction_following_loose(example, response)
    followed = ", ".join(f"{name}={'ok' if ok else 'no'}" for name, ok in
                         zip(instruction_ids, strict.follow_instruction_list, strict=True))
    detail = (f"strict={strict.follow_all_instructions} loose={loose.follow_all_instructions}"
              f" [{followed}]")
    rule = final_answer_rule(output, response)
    if rule is None:
        detail = f"nothing extracted: no final answer; {detail}"
    return Verdict(bool(strict.follow_all_instructions), response or None, detail, rule)
