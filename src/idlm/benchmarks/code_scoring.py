"""Score code answers by running them in the sandbox.

Programs follow the human-eval / evalplus conventions: the problem's prompt (or the
model's full function) + the benchmark's ``test`` code + ``check(entry_point)``; MBPP and
the tiny profile run their ``assert`` lists; LiveCodeBench runs its own harness over
stdin/stdout or LeetCode-style tests. A candidate passes only if the program exits 0 *and*
prints a per-run random sentinel after the last test, so ``os._exit(0)`` is no pass.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idlm.benchmarks.answers import THINK_OPEN, defined_functions, extract_code, strip_thinking
from idlm.benchmarks.base import Verdict
from idlm.benchmarks.sandbox import ExecutionResult, run_program
from idlm.config.downstream import EvalSandbox

LCB_HARNESS = Path(__file__).with_name("_lcb_harness.py")
LCB_TEST_TIMEOUT_S = 6.0  # LiveCodeBench's own per-test limit
LCB_RUN_TIMEOUT_CAP_S = 300.0


@dataclass(frozen=True)
class CodeAnswer:
    """The program taken from an answer, the rule that took it, and a note for the verdict
    (a function defined under another name than the entry point)."""

    code: str
    rule: str
    note: str = ""

    def describe(self) -> str:
        return f"{self.rule}{f'; {self.note}' if self.note else ''}"


def looks_like_python(text: str) -> bool:
    """Whether unfenced text is a program or a bare function body (human-eval's completion
    form) rather than prose: a prose answer is "nothing extracted", not a failed program."""
    import ast
    import textwrap

    for candidate in (text, "def _body():\n" + textwrap.indent(textwrap.dedent(text), "    ")):
        try:
            ast.parse(candidate)
        except (SyntaxError, ValueError):
            continue
        return True
    return False


def final_code(output: str, entry_point: str | None = None) -> CodeAnswer:
    """The candidate program from a model output: after thinking, out of its fences."""
    final = strip_thinking(output)
    if not final.strip():
        why = "unterminated thinking (no </think>)" if THINK_OPEN in output else "empty answer"
        return CodeAnswer("", why)
    code, rule = extract_code(final, entry_point)
    if rule.startswith("whole answer") and not looks_like_python(code):
        return CodeAnswer("", "no fenced block, and the answer is not Python")
    named = defined_functions(code)
    note = ""
    if entry_point and named and entry_point not in named:
        # Usually a renamed function (remove_occ for remove_Occ): the tests then fail with
        # a NameError, and the detail should say why rather than show only the traceback.
        note = (f"defines {', '.join(f'{name}()' for name in named)}, "
                f"not the entry point {entry_point}()")
    return CodeAnswer(code, rule, note)


def _sentinel() -> str:
    return f"IDLM_ALL_TESTS_PASSED_{secrets.token_hex(8)}"


def _verdict(result: ExecutionResult, sentinel: str, answer: CodeAnswer) -> Verdict:
    passed = result.status == "ok" and sentinel in result.stdout
    if passed:
        outcome = f"passed in {result.seconds:.2f}s"
    elif result.status == "timeout":
        outcome = "timed out"
    else:
        last = (result.stderr.strip().splitlines() or ["exited 0 before the tests finished"])[-1]
        outcome = f"failed (exit {result.returncode}): {last[:300]}"
    return Verdict(passed, answer.code, f"{outcome} [{answer.describe()}]", answer.rule)


def _no_code(answer: CodeAnswer) -> Verdict | None:
    if answer.code.strip():
        return None
    return Verdict(False, None, f"nothing extracted: no code in the answer ({answer.rule})")


def run_test_program(program: str, answer: CodeAnswer, settings: EvalSandbox) -> Verdict:
    """Run ``program`` (candidate + tests) and pass it if it reaches the end."""
    if (empty := _no_code(answer)) is not None:
        return empty
    sentinel = _sentinel()
    script = f"{program}\n\nprint({sentinel!r})\n"
    return _verdict(run_program({"main.py": script}, "main.py", settings), sentinel, answer)


def prompt_imports(prompt: str) -> str:
    """The top-level import lines of a HumanEval prompt (kept when the model rewrites the
    function; an import inside the function body comes with the function)."""
    return "\n".join(line for line in prompt.splitlines()
                     if re.match(r"(from\s+\S+\s+)?import\s", line))


def humaneval_program(prompt: str, code: str, test: str, entry_point: str) -> str:
    """A full function from the model is used as is (plus the prompt's imports); a bare
    body is appended to the prompt, as human-eval does with completions."""
    defines = re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code) is not None
    solution = f"{prompt_imports(prompt)}\n{code}" if defines else prompt + code
    return f"{solution}\n\n{test}\n\ncheck({entry_point})\n"


def assert_program(code: str, tests: list[str], setup: str = "",
                   imports: list[str] | None = None) -> str:
    """MBPP and the tiny profile: imports, the candidate, setup code, then each assert."""
    head = "\n".join(imports or [])
    return f"{head}\n{code}\n\n{setup}\n" + "\n".join(tests) + "\n"


# ---------------------------------------------------------------- LiveCodeBench
class _NoGlobals(pickle.Unpickler):
    """LCB's private tests are a pickled *string*; refuse anything that names a global."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in test data")


def decode_lcb_tests(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Public or private LCB test cases: JSON text, or base64(zlib(pickle(JSON text)))."""
    if isinstance(raw, list):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        packed = zlib.decompress(base64.b64decode(raw.encode()))
        return json.loads(_NoGlobals(io.BytesIO(packed)).load())


def score_lcb(answer: CodeAnswer, cases: list[dict[str, Any]], func_name: str | None,
              settings: EvalSandbox) -> Verdict:
    """All of a problem's test cases in one sandboxed run, each with its own time limit."""
    code = answer.code
    if not cases:
        return Verdict(False, code, "problem has no test cases")
    if (empty := _no_code(answer)) is not None:
        return empty
    functional = cases[0].get("testtype") == "functional"
    if functional and not func_name:
        return Verdict(False, code, "functional problem without metadata.func_name")
    sentinel = _sentinel()
    per_test = min(LCB_TEST_TIMEOUT_S, settings.timeout_s)
    spec = {"mode": "functional" if functional else "stdin", "func_name": func_name,
            "timeout_s": per_test, "sentinel": sentinel,
            "cases": [{"input": case["input"], "output": case["output"]} for case in cases]}
    files = {"harness.py": LCB_HARNESS.read_text(encoding="utf-8"), "candidate.py": code,
             "tests.json": json.dumps(spec)}
    budget = min(LCB_RUN_TIMEOUT_CAP_S, per_test * len(cases) + 5.0)
    result = run_program(files, "harness.py", settings, timeout_s=budget)
    return _verdict(result, sentinel, answer)
