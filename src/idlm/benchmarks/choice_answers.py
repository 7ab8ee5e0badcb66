"""Read the chosen option letter (ARC-C, MMLU, MMLU-Pro A-J, GPQA, MathBench single choice).

Explicit statements first; the last one wins and a closing statement that names two
letters is a conflict (see ``extraction.decide``). Each rule follows a published extractor:

* ``answer statement``: ``Answer: C``, ``**Final Answer:** (C)``, ``the answer is (C)``,
  ``the correct choice is C``, ``I'll go with C``. simple-evals' multiple-choice pattern
  (``common.py``: ``(?i)Answer[ \\t]*:[ \\t]*\\$?([A-D])\\$?``) and lm-eval's MMLU-Pro
  filter (``answer is \\(?([A-J])\\)?``), with markdown and LaTeX allowed around the letter;
* ``\\boxed letter``: ``\\boxed{C}``, ``\\boxed{\\text{(C)}}``; OpenCompass
  ``first_option_postprocess`` (``boxed{X}``);
* ``letter is correct``: ``Option C is correct``, ``(C) is the right answer``; the backup
  pattern ``([A-D])\\)?\\s+is\\s+correct`` of OLMES-style MMLU extraction, here only for a
  letter marked as an option (word, brackets, bold) or opening a sentence;
* ``answer names option text``: ``The answer is: photosynthesis`` when that is exactly one
  option's text; our addition (models restate the option instead of its letter), taken
  only when the options are known.

Only when nothing is stated explicitly, weaker forms, each taken only if it points at one
letter (an option-by-option review in bold points at all of them): a **bold** letter, a
line with a letter and that option's own text, an answer that is just a letter, a last
line that starts with ``C)`` / ``(C)`` / ``C.`` (MMLU-Pro's ``extract_final`` takes any last
capital letter; we do not, since ``I`` and ``A`` are words far more often than answers).
Letters are upper case only for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from idlm.benchmarks.answers import boxed_spans, strip_latex_text
from idlm.benchmarks.extraction import Candidate, Extraction, decide, nothing, taken

Options = Sequence[str] | Mapping[str, str] | None

_QUALIFIER = r"(?:final|correct|right|best|only\s+correct|most\s+(?:likely|appropriate|accurate))"
_VERB = (r"\s*(?:is|would\s+be|should\s+be|must\s+be|will\s+be|=|:|：)"
         r"(?:\s+(?:probably|likely|clearly|therefore|thus|indeed))?\s*:?")
_LEAD = (
    r"(?i:"
    # "the answer is", "Answer:", "My final answer is", "The answer to this question is"
    rf"\b(?:(?:the|my|our)\s+)?(?:{_QUALIFIER}\s+)?answer(?:\s+(?:choice|option|letter))?"
    rf"(?:\s+to\s+(?:this|the)\s+(?:question|problem))?{_VERB}"
    # "The correct option is", "Correct choice:"
    rf"|\b(?:the\s+)?{_QUALIFIER}\s+(?:option|choice|response|letter){_VERB}"
    # a "Final Answer" heading with the letter on its own line below
    r"|\bfinal\s+answer\s*\**\s*\n"
    # "I'll go with", "I choose", "we select"
    r"|\b(?:I|we)(?:'ll|\s+will|\s+would)?\s+(?:choose|pick|select|go\s+with)\b"
    r")(?i:\s*(?:option|choice|letter)\b)?"
)
# Markdown, math delimiters and LaTeX wrappers that may stand between a lead and its letter.
_FILL = (r"[\s*_`$]*(?:\\[(\[]\s*)?(?:\\(?:boxed|textbf|text|mathrm|mathbf)\s*\{[\s*]*)*"
         r"[(\[]?[\s*]*")
_END = r"[)\]]?(?![\w'’])"


def _letter_class(letters: str) -> str:
    return f"[{re.escape(letters)}]"


def _statements(text: str, letters: str) -> list[Candidate]:
    letter = _letter_class(letters)
    # "Answer: A or C", "Answer: A, C": one statement naming two letters.
    more = rf"(?=\s*(?:,|/|&|\bor\b|\band\b)\s*[(\[]?{letter}[)\]]?\s*(?:[.,;:*$]|$))"
    pattern = re.compile(rf"{_LEAD}{_FILL}({letter}){_END}({more})?", re.MULTILINE)
    return [Candidate(m.group(1), "answer statement", m.start(), m.end(), m.group(0),
                      ambiguous=m.group(2) is not None) for m in pattern.finditer(text)]


def _boxed(text: str, letters: str) -> list[Candidate]:
    found = []
    for start, end, contents in boxed_spans(text):
        inner = strip_latex_text(contents).strip(" *")
        match = re.fullmatch(rf"[(\[]?({_letter_class(letters)})(?:[)\].:]\s*.*|\s*)", inner,
                             re.DOTALL)
        if match:
            found.append(Candidate(match.group(1), "\\boxed letter", start, end,
                                   text[start:end]))
    return found


def _is_correct(text: str, letters: str) -> list[Candidate]:
    # The letter must be marked as an option (word, brackets, bold) or open a sentence, so
    # an article "A" in running text is not read as an answer.
    pattern = re.compile(
        rf"(?:(?i:\b(?:option|choice)\s+)|(?:^|(?<=[.!?:]\s))[*\s]*|[(\[*]+)"
        rf"({_letter_class(letters)})[)\]*]*\s+is\s+(?:the\s+)?(?i:correct|right|best)"
        r"(?i:\s+(?:answer|option|choice|one))?\b", re.MULTILINE)
    return [Candidate(m.group(1), "letter is correct", m.start(), m.end(), m.group(0))
            for m in pattern.finditer(text)]


def option_map(options: Options, letters: str) -> dict[str, str]:
    """Letter -> option text, from a list (in letter order) or a mapping."""
    if not options:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip(): str(v) for k, v in options.items() if str(k).strip() in letters}
    return dict(zip(letters, (str(option) for option in options), strict=False))


def _plain(text: str) -> str:
    """Option text as compared: no LaTeX wrappers, markdown, case or trailing punctuation."""
    text = strip_latex_text(text).replace("\\", "")
    return " ".join(re.sub(r"[*_`]", "", text).lower().split()).strip(" .;:!,'\"")


def _matches_option(said: str, option: str) -> bool:
    said, option = _plain(said), _plain(option)
    if not option:
        return False
    return said == option or (said.startswith(option) and not said[len(option)].isalnum())


def _named_options(text: str, letters: str, by_letter: dict[str, str]) -> list[Candidate]:
    if not by_letter:
        return []
    found = []
    for m in re.finditer(rf"{_LEAD}[\s*_`$]*([^\n]+)", text):
        said = m.group(1)
        if re.match(rf"[(\[]?{_letter_class(letters)}(?![\w'’])", said):
            continue  # a letter statement, read above
        hits = [letter for letter, option in by_letter.items() if _matches_option(said, option)]
        if len(hits) == 1:
            found.append(Candidate(hits[0], "answer names option text", m.start(), m.end(),
                                   m.group(0)))
    return found


def _only(letters_found: list[tuple[str, str]], rule: str) -> Extraction | None:
    """The weak rules' answer: taken only when every match names the same letter."""
    distinct = list(dict.fromkeys(letter for letter, _ in letters_found))
    if len(distinct) != 1:
        return None
    return taken(Candidate(distinct[0], rule, 0, 0, letters_found[-1][1]))


def _weak(text: str, letters: str, by_letter: dict[str, str]) -> Extraction | None:
    letter = _letter_class(letters)
    bold = [(m.group(1), m.group(0)) for m in re.finditer(
        rf"\*\*[\s$]*[(\[]?({letter})(?:[)\].:][^*\n]*|[\s$]*)\*\*", text)]
    with_text = [(m.group(1), m.group(0).strip()) for m in re.finditer(
        rf"^[\s*#>-]*[(\[]?({letter})[)\].:]\**[ \t]+([^\n]+)", text, re.MULTILINE)
        if m.group(1) in by_letter and _matches_option(m.group(2), by_letter[m.group(1)])]
    lone = re.fullmatch(rf"[*\s(\[$]*({letter})[)\].:*$\s]*", text.strip())
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    marked = [re.match(rf"[*\s#>-]*[(\[]?({letter})(?:[).:](?:\s|$)|\**$)", line)
              for line in lines]
    # The last line counts only if it is the one line marked with a letter: in a list of
    # options ("A) ... B) ...") the last item is not the answer.
    last = [(m.group(1), lines[-1]) for m in marked if m] if marked and marked[-1] else []
    return (_only(bold, "bold letter")
            or _only(with_text, "letter with its option text")
            or (_only([(lone.group(1), lone.group(0))], "answer is a lone letter")
                if lone else None)
            or _only(last, "last line starts with a letter"))


def extract_choice(text: str, letters: str = "ABCD", options: Options = None) -> Extraction:
    """The option letter the final answer ``text`` states, the rule and the matched text."""
    by_letter = option_map(options, letters)
    explicit = (_statements(text, letters) + _boxed(text, letters)
                + _is_correct(text, letters) + _named_options(text, letters, by_letter))
    decided = decide(text, explicit)
    if decided is not None:
        return decided
    weak = _weak(text, letters, by_letter)
    return weak or nothing(f"no option letter ({letters}) stated")
