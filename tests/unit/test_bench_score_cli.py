"""``idlm score``: one answer through a benchmark's real extractor and scorer."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from idlm.benchmarks import sandbox
from idlm.cli import score as score_cli

# Our own candidates only; without namespaces (not root) they run with rlimits only.
UNSANDBOXED = [] if sandbox.isolation_available() else ["--allow-unsandboxed"]


def score(argv: list[str], stdin: str = "", monkeypatch: pytest.MonkeyPatch | None = None,
          capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, dict | str]:
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = score_cli.main(argv)
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


def test_flags(capsys) -> None:
    code, verdict = score(["--benchmark", "math500", "--prediction",
                           "<think>1/2?</think> so $\\boxed{\\dfrac{3}{4}\\text{ m}}$",
                           "--reference", "\\frac{3}{4}"], capsys=capsys)
    assert code == 0 and verdict["correct"] is True and verdict["extracted"] == "\\frac{3}{4}"
    code, verdict = score(["--benchmark", "mmlu_pro", "--prediction", "Answer: (J)",
                           "--reference", "I"], capsys=capsys)
    assert code == 0 and verdict["correct"] is False and verdict["extracted"] == "J"


def test_the_verdict_says_which_rule_read_what(capsys) -> None:
    code, verdict = score(["--benchmark", "arc_challenge", "--reference", "C", "--prediction",
                           "Considering the options, the correct choice is (C) because "
                           "plants need light."], capsys=capsys)
    assert code == 0 and verdict["correct"] is True and verdict["rule"] == "answer statement"
    assert verdict["detail"] == "answer statement: 'the correct choice is (C)' -> C; gold C"
    code, verdict = score(["--benchmark", "gsm8k", "--reference", "72", "--prediction",
                           "<think>48+24</think>\n#### 72\n\n\\boxed{96}"], capsys=capsys)
    assert code == 0 and verdict["correct"] is False and verdict["rule"] is None
    assert verdict["detail"].startswith("nothing extracted: conflicting final answers")


def test_json_on_stdin(monkeypatch, capsys) -> None:
    request = {"benchmark": "ifeval", "prediction": "all lowercase, no capitals here",
               "reference": {"instruction_id_list": ["change_case:english_lowercase"],
                             "kwargs": [{}]}}
    code, verdict = score([], json.dumps(request), monkeypatch, capsys)
    assert code == 0 and verdict["correct"] is True and "strict=True" in verdict["detail"]
    request = {"benchmark": "humaneval", "reference": "HumanEval/0",
               "prediction": "```python\ndef has_close_elements(numbers, threshold):\n"
                             "    return False\n```"}
    code, verdict = score(UNSANDBOXED, json.dumps(request), monkeypatch, capsys)
    assert code == 0 and verdict["correct"] is False


def test_errors_are_one_line(capsys) -> None:
    code, err = score(["--benchmark", "nope", "--prediction", "x"], capsys=capsys)
    assert code == 2 and "unknown benchmark 'nope'" in err
    code, err = score(["--benchmark", "humaneval", "--prediction", "x", "--reference",
                       "HumanEval/9999"], capsys=capsys)
    assert code == 2 and "no HumanEval task" in err


def test_add_parser_plugs_into_a_cli() -> None:
    parser = argparse.ArgumentParser(prog="idlm")
    score_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", "--benchmark", "gsm8k", "--prediction", "#### 3",
                              "--reference", "3"])
    assert args.handler is score_cli.run and args.benchmark == "gsm8k"
