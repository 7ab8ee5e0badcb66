"""Read a final number (GSM8K, AIME, the tiny profile's arithmetic).

Explicit statements first, the last one winning (``extraction.decide``):

* ``#### marker``: GSM8K's own convention (``#### 1,234``), as lm-eval's ``strict-match``;
* ``\\boxed``: the boxed value, units and currency dropped (``\\boxed{\\$18}``,
  ``\\boxed{72 \\text{ clips}}``, ``\\boxed{033}``); a boxed expression that is not a plain
  number (``\\boxed{\\frac{9}{2}}``) is kept whole for math-verify;
* ``answer statement``: ``The answer is $18.``, ``Final answer: 72 clips``, ``**Answer:**
  18``; within the statement the number after its last ``=`` (``Answer: 48 + 24 = 72``),
  as simple-evals' and OpenCompass's "answer is" patterns read it.

Then, only if nothing was stated, weaker forms: the last **bold** number (a highlighted
result), then the last number of the answer outside parentheses, so a closing restatement
of the question's numbers ("(48 in April, 24 in May)") is not taken for the result; this
is lm-eval's ``flexible-extract`` (last number) with that one exception.
"""

from __future__ import annotations

import re

from idlm.benchmarks.answers import boxed_spans, normalise_number, strip_latex_text
from idlm.benchmarks.extraction import Candidate, Extraction, decide, nothing, taken

# 1,234.5 | 1234 | .5 ; not the tail of a word or a decimal ("x2", "3.14" read as 14).
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
                    r"|(?<![\w.])-?\.\d+")
_LEAD = (r"(?i:\b(?:(?:the|my|our)\s+)?(?:final\s+)?answer"
         r"(?:\s+to\s+(?:this|the)\s+(?:question|problem))?"
         r"\s*(?:is|would\s+be|will\s+be|=|:|：)\s*:?|\bfinal\s+answer\s*\**\s*\n)")
# A statement's clause: up to a sentence end, a line end or ", because"-style continuation.
_CLAUSE = r"[^\n]*?(?=\.\s|\.$|\n|;|,\s|$)"
_MORE = re.compile(r"^\s*(?:or|and|/)\s*\$?\s*-?\d")


def _clean(text: str) -> str:
    """Unicode minus and LaTeX thousands (``2{,}400``) as plain text."""
    return text.replace("−", "-").replace("{,}", ",").replace("\\!", "")


def _number_in(clause: str) -> re.Match[str] | None:
    """The stated number of a clause: after its last ``=``, else its first number."""
    tail = clause.rsplit("=", 1)[-1] if "=" in clause else clause
    offset = len(clause) - len(tail)
    match = NUMBER.search(tail)
    return NUMBER.search(clause, offset + match.start()) if match else None


def boxed_value(contents: str) -> str:
    """A boxed plain number without its units and currency; any other contents unchanged."""
    plain = strip_latex_text(contents.replace("\\$", "$").replace("\\%", "%"))
    plain = re.sub(r"\^\{?\\circ\}?|\\(?:dollars?|text\w*)\b", "", _clean(plain))
    match = re.fullmatch(rf"\s*\$?\s*({NUMBER.pattern})\s*%?\s*[A-Za-z .]*", plain)
    if match:
        return normalise_number(match.group(1)) or contents
    return contents


def _markers(text: str) -> list[Candidate]:
    found = []
    for m in re.finditer(rf"####[ \t]*\$?[ \t]*({NUMBER.pattern})", text):
        found.append(Candidate(normalise_number(m.group(1)) or m.group(1), "#### marker",
                               m.start(), m.end(), m.group(0)))
    return found


def _boxed(text: str) -> list[Candidate]:
    return [Candidate(boxed_value(contents), "\\boxed", start, end, text[start:end])
            for start, end, contents in boxed_spans(text)]


def _statements(text: str) -> list[Candidate]:
    found = []
    for m in re.finditer(rf"{_LEAD}({_CLAUSE})", text):
        clause = m.group(1)
        if "\\boxed" in clause:
            continue  # the boxed rule reads it, fractions and all
        number = _number_in(clause)
        if number is None:
            continue
        end = m.start(1) + number.end()
        found.append(Candidate(normalise_number(number.group(0)) or number.group(0),
                               "answer statement", m.start(), end, text[m.start():end],
                               ambiguous=bool(_MORE.match(clause[number.end():]))))
    return found


def _bold(text: str) -> Extraction | None:
    spans = [m for m in re.finditer(r"\*\*([^*\n]+)\*\*", text)
             if not re.match(r"(?i)\s*step\b", m.group(1)) and not m.group(1).rstrip()
             .endswith(":")]
    for m in reversed(spans):
        number = _number_in(m.group(1))
        if number is not None:
            return taken(Candidate(normalise_number(number.group(0)) or number.group(0),
                                   "bold number", m.start(), m.end(), m.group(0)))
    return None


def _last_number(text: str) -> Extraction | None:
    outside = re.sub(r"\([^()\n]*\)", lambda m: " " * len(m.group(0)), text)
    for source, rule in ((outside, "last number"), (text, "last number (in parentheses)")):
        numbers = list(NUMBER.finditer(source))
        if numbers:
            last = numbers[-1]
            return taken(Candidate(normalise_number(last.group(0)) or last.group(0), rule,
                                   last.start(), last.end(), text[last.start():last.end()]))
    return None


def extract_number(text: str) -> Extraction:
    """The final number the answer ``text`` states (or a boxed expression), and its rule."""
    text = _clean(text)
    decided = decide(text, _markers(text) + _boxed(text) + _statements(text))
    if decided is not None:
        return decided
    return _bold(text) or _last_number(text) or nothing("no number found")
