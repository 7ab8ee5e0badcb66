"""LiveCodeBench test harness, copied into the sandbox next to ``candidate.py`` and
``tests.json`` and run there (standard library only).

``stdin`` problems: the candidate runs as ``__main__`` with each test's input on stdin;
its stdout must match line by line (tokens compared as numbers when they are numbers).
``functional`` (LeetCode) problems: ``Solution().<func_name>(*args)`` with one JSON value
per input line must equal the JSON output. Each test has its own time limit; the first
failing test ends the run with exit status 1; all passing prints the sentinel.
"""

import io
import json
import signal
import sys

PREAMBLE = (
    "from typing import *\nfrom collections import *\nfrom itertools import *\n"
    "from functools import *\nfrom heapq import *\nfrom bisect import *\nfrom math import *\n"
    "import math, heapq, bisect, itertools, functools, collections, string, re, sys\n"
)


def on_alarm(_signum, _frame):
    raise TimeoutError("test timed out")


def run_stdin(code, text):
    stdin = io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    saved = sys.stdin, sys.stdout
    sys.stdin, sys.stdout = stdin, stdout
    try:
        exec(code, {"__name__": "__main__"})
    except SystemExit:
        pass
    finally:
        sys.stdin, sys.stdout = saved
    stdout.flush()
    return stdout.buffer.getvalue().decode("utf-8", errors="replace")


def tokens_match(got, expected):
    if got == expected:
        return True
    if len(got) != len(expected):
        return False
    try:
        return all(abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
                   for a, b in zip(got, expected, strict=True))
    except ValueError:
        return False


def outputs_match(got, expected):
    got_lines = [line.strip() for line in got.strip().splitlines()]
    expected_lines = [line.strip() for line in expected.strip().splitlines()]
    if len(got_lines) != len(expected_lines):
        return False
    return all(tokens_match(a.split(), b.split()) for a, b in zip(got_lines, expected_lines,
                                                                   strict=True))


def run_functional(code, func_name, text, expected):
    namespace = {"__name__": "candidate"}
    exec(code, namespace)
    solution = namespace["Solution"]()
    args = [json.loads(line) for line in text.split("\n") if line.strip()]
    result = getattr(solution, func_name)(*args)
    if isinstance(result, tuple):
        result = list(result)
    return result == json.loads(expected)


def main():
    with open("tests.json", encoding="utf-8") as handle:
        spec = json.load(handle)
    with open("candidate.py", encoding="utf-8") as handle:
        code = compile(PREAMBLE + handle.read(), "candidate.py", "exec")
    signal.signal(signal.SIGALRM, on_alarm)
    for index, case in enumerate(spec["cases"]):
        signal.setitimer(signal.ITIMER_REAL, spec["timeout_s"])
        try:
            if spec["mode"] == "functional":
                passed = run_functional(code, spec["func_name"], case["input"], case["output"])
            else:
                passed = outputs_match(run_stdin(code, case["input"]), case["output"])
        except BaseException as error:  # the candidate's fault, whatever it raised
            passed = False
            print(f"test {index}: {type(error).__name__}: {error}", file=sys.stderr)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if not passed:
            print(f"failed test {index} of {len(spec['cases'])}", file=sys.stderr)
            sys.exit(1)
    print(spec["sentinel"])


if __name__ == "__main__":
    main()
