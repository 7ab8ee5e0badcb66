"""Pull the final answer out of a model's output: the text after thinking, a ``\\boxed{}``,
a multiple-choice letter, a GSM8K number, a fenced code block.

Each extractor looks for the answer where a model *states* it (``Answer: C``, ``#### 18``,
the last ``\\boxed{}``) before any weaker fallback, so a letter or number that only occurs
inside the explanation is not taken for the answer.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def strip_thinking(output: str) -> str:
    """The final answer part: text after the last ``</think>``.

    Unterminated thinking (``<think>`` but no ``</think>``: the budget ran out mid-thought)
    has no final answer and gives "". Output without any think tag is returned whole.
    """
    if THINK_CLOSE in output:
        output = output.rsplit(THINK_CLOSE, 1)[1]
    elif THINK_OPEN in output:
        return ""
    # Leading blank lines go, leading spaces stay: a bare function body keeps its indent.
    lines = output.rstrip().splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept)."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, index = 1, start
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth == 0:
            return text[start:index - 1].strip()
    loose = re.findall(r"\\boxed ([^\s$]+)", text)  # "\boxed 5"
    return loose[-1] if loose else None


def strip_latex_text(value: str) -> str:
    """``\\text{C}`` -> ``C``; drops ``$``, ``\\,`` and surrounding spaces."""
    value = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", value)
    return value.replace("$", "").replace("\\,", "").replace("\\!", "").strip()


# ---------------------------------------------------------------- multiple choice
def extract_choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter, or None.

    In order: the last ``Answer: X`` / ``the answer is (X)``, the last ``\\boxed{X}``, an
    output that is just the letter, a last line that starts with ``X)`` / ``(X)`` / ``X.``.
    """
    letter_class = f"[{re.escape(letters)}]"
    stated = re.findall(
        rf"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*[*_\s]*(?:\\boxed\{{\s*(?:\\text\{{)?)?"
        rf"[(\[]?\s*({letter_class})(?![A-Za-z0-9])", text)
    if stated:
        return stated[-1]
    boxed = last_boxed(text)
    if boxed is not None:
        inner = strip_latex_text(boxed).strip("()[] .")
        if len(inner) == 1 and inner in letters:
            return inner
    bare = re.fullmatch(rf"[*\s(\[]*({letter_class})[)\].:*\s]*", text.strip())
    if bare:
        return bare.group(1)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        last = re.match(rf"[*\s]*\(?({letter_class})[).:](?:\s|$)", lines[-1])
        if last:
            return last.group(1)
    return None


# ---------------------------------------------------------------- numbers
def normalise_number(text: str) -> str | None:
    """``1,234.50`` -> ``1234.5``; None if ``text`` is not one number."""
    cleaned = strip_latex_text(text).replace(",", "").replace("\\%", "").rstrip(".%")
    cleaned = re.sub(r"^\\?\$|^\$", "", cleaned).strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def extract_gsm8k_answer(text: str) -> str | None:
    """GSM8K's convention first (``#### 18``), then the last ``\\boxed{}``, then
    ``the answer is 18``, then the last number in the text."""
    marked = re.findall(r"####\s*\$?\s*(" + NUMBER.pattern + ")", text)
    if marked:
        return marked[-1].replace(",", "")
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    stated = re.findall(r"(?i:answer)\s*(?:is|:)\s*\$?\s*(" + NUMBER.pattern + ")", text)
    if stated:
        return stated[-1].replace(",", "")
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def gsm8k_gold(reference: str) -> str:
    """The gold number of a GSM8K solution (text after ``####``) or a bare answer."""
    return reference.rsplit("####", 1)[-1].strip().replace(",", "")


# ---------------------------------------------------------------- code
FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_TAGS = ("", "python", "py", "python3", "python2")


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The candidate program: the last fenced block that defines ``entry_point`` (if
    given), else the last Python block, else an unclosed final block, else the raw text."""
    blocks = [(tag.lower(), body) for tag, body in FENCE.findall(text)]
    python_blocks = [body for tag, body in blocks if tag in PYTHON_TAGS]
    if entry_point:
        defining = [body for body in python_blocks
                    if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", body)]
        if defining:
            return defining[-1]
    if python_blocks:
        return python_blocks[-1]
    unclosed = re.search(r"```[ \t]*(?:python|py)?[^\n]*\n(.*)$", text, re.DOTALL)
    if unclosed and "```" not in unclosed.group(1):
        return unclosed.group(1)
    return text
