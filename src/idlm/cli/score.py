"""``idlm score``: score one answer with a benchmark's real extractor and scorer.

    idlm score --benchmark gsm8k --prediction "... #### 18" --reference 18
    idlm score --benchmark mmlu_pro --prediction "Answer: (C)" --reference C
    idlm score --benchmark humaneval --prediction "$(cat answer.md)" --reference HumanEval/0
    echo '{"benchmark": "ifeval", "prediction": "...", "reference": {"instruction_id_list":
          ["punctuation:no_comma"], "kwargs": [{}]}}' | idlm score

With no ``--prediction`` a JSON object is read from stdin (keys ``benchmark``,
``prediction``, ``reference``, optional ``meta``). Prints the verdict as JSON: ``correct``,
``extracted``, ``rule`` (which extraction rule read the answer; null when nothing could be
read) and ``detail`` (the text the rule matched, or why nothing was taken).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``score`` on the ``idlm`` command's subparsers."""
    parser = subparsers.add_parser(
        "score", help="score one answer with a benchmark's extractor and scorer",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", help="benchmark name, e.g. gsm8k, math500, humaneval")
    parser.add_argument("--prediction", help="the model output (default: JSON on stdin)")
    parser.add_argument("--reference", help="gold answer: a letter, a number, LaTeX, a "
                        "HumanEval task id, or a JSON object")
    parser.add_argument("--meta", default=None, help="extra scorer metadata as JSON")
    parser.add_argument("--allow-unsandboxed", action="store_true",
                        help="run code answers without namespace isolation (UNSAFE)")
    parser.set_defaults(handler=run)
    return parser


def _json_or_text(value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith(("{", "[")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _request(args: argparse.Namespace) -> dict[str, Any]:
    if args.prediction is not None:
        request = {"benchmark": args.benchmark, "prediction": args.prediction,
                   "reference": args.reference, "meta": args.meta}
    else:
        request = json.loads(sys.stdin.read())
        if not isinstance(request, dict):
            raise ValueError("stdin must hold one JSON object")
        request.setdefault("benchmark", args.benchmark)
    missing = [key for key in ("benchmark", "prediction") if not request.get(key)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (flags or stdin JSON)")
    request["reference"] = _json_or_text(request.get("reference"))
    meta = _json_or_text(request.get("meta")) or {}
    if not isinstance(meta, dict):
        raise ValueError("--meta must be a JSON object")
    request["meta"] = meta
    return request


def run(args: argparse.Namespace) -> int:
    from idlm.benchmarks import get_benchmark
    from idlm.config.downstream import EvalSandbox

    try:
        request = _request(args)
        sandbox = EvalSandbox(allow_unsandboxed=args.allow_unsandboxed)
        benchmark = get_benchmark(request["benchmark"], sandbox)
        sample = benchmark.sample_from_reference(request["reference"], request["meta"])
        verdict = benchmark.score(request["prediction"], sample)
    except (KeyError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # "rule" names the extraction rule that read the answer (null: nothing could be read);
    # "detail" shows the text it matched, or why nothing was taken.
    print(json.dumps({"benchmark": benchmark.name, "correct": verdict.correct,
                      "extracted": verdict.extracted, "rule": verdict.rule,
                      "detail": verdict.detail, "reference": sample.reference},
                     indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", *(argv if argv is not None else sys.argv[1:])])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
