"""``idlm generate``: decode one prompt with AR, ISD or R-ISD; print the text and the stats.

    idlm generate --model outputs/ic/model --mode isd --stride 4 "What is 2+3?"
    idlm generate --model outputs/base/model --adapter outputs/lora/adapter --mode risd "..."

The model folder holds the tokenizer; the prompt goes through its chat template (a user
turn plus the assistant header) unless ``--no-chat-template``. ``--json`` prints one JSON
object for scripts. Exit status: 0 ok, 2 bad input (one ``error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``idlm`` command's subparsers."""
    from idlm.decoding import algorithms  # the registry: light, torch loads later

    parser = subparsers.add_parser(
        "generate", help="decode a prompt with AR, ISD or R-ISD and print text + stats",
        description="Decode one prompt; prints the text and the decoding statistics.")
    parser.add_argument("prompt", help="the user message (or raw text with --no-chat-template)")
    parser.add_argument("--model", required=True,
                        help="model folder with its tokenizer: the IC model for isd, the base "
                             "model for ar and risd")
    parser.add_argument("--adapter", default=None, help="gated LoRA folder (risd only)")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="load an adapter on weights other than those it was trained on "
                             "(experiments: R-ISD then equals AR decoding of these weights)")
    parser.add_argument("--mode", choices=algorithms.systems(), default="isd")
    parser.add_argument("--stride", type=int, default=4, help="ISD stride N (default 4)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proposal", choices=algorithms.proposals(),
                        default=algorithms.DEFAULT_PROPOSAL,
                        help="draft proposals at T>0: sample from q or argmax q (both "
                             "exact: argmax is verified as a one-hot proposal)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string (repeatable); the eos token always stops")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder's layers (compiles on the first "
                             "requests; falls back to eager if compiling fails)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=handle_generate)
    return parser


def handle_generate(args: argparse.Namespace) -> int:
    """Load, encode, decode, print. Heavy imports happen here, not at ``--help``."""
    from idlm.decoding.loading import load_engine
    from idlm.decoding.requests import DecodingError

    problem = argument_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()   # no loading bars in logs: errors stay one line
    try:
        engine = load_engine(args.model, args.adapter, args.mode, device=args.device,
                             dtype=args.dtype, allow_other_base=args.allow_other_base,
                             compile=args.compile)
        prompt_ids = encode_prompt(engine.tokenizer, args.prompt, not args.no_chat_template)
        started = time.perf_counter()
        result = engine.generate([_request(args, prompt_ids)])[0]
        seconds = time.perf_counter() - started
    except DecodingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.error is not None:
        print(f"error: {result.error}", file=sys.stderr)
        return 2
    text = engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    report = {"mode": args.mode, "stride": result.stats.stride, "text": text,
              "prompt_tokens": len(prompt_ids), "token_ids": result.token_ids,
              "finish_reason": result.finish_reason, "seconds": seconds,
              "tokens_per_second": len(result.token_ids) / seconds if seconds else None,
              "proposal": args.proposal,
              "stats": result.stats.as_dict()}
    print(json.dumps(report) if args.json else _human(report))
    return 0


def argument_error(args: argparse.Namespace) -> str | None:
    """Problems visible from the arguments alone, reported before any model is loaded."""
    from idlm.decoding import algorithms
    from idlm.decoding.requests import sampling_error

    algorithm = algorithms.get(args.mode)
    if (problem := algorithm.stride_error(args.stride)) is not None:
        return problem
    if algorithm.gated and args.adapter is None:
        return f"mode {args.mode} needs an adapter: pass --adapter DIR (a gated LoRA folder)"
    if not algorithm.gated and args.adapter is not None:
        gated = " or ".join(a for a in algorithms.systems() if algorithms.get(a).gated)
        return f"an adapter is only used in mode {gated} (got mode {args.mode})"
    return sampling_error(_request(args, [0]).sampling, can_decode_text=True)


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    from idlm.decoding.requests import DecodingError

    if tokenizer is None:
        raise DecodingError("the model folder has no tokenizer: save one next to the model")
    if not chat:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DecodingError("the tokenizer has no chat template: pass --no-chat-template")
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") \
        else encoded
    return [int(token) for token in ids]


def _request(args: argparse.Namespace, prompt_ids: list[int]) -> Any:
    from idlm.decoding import algorithms
    from idlm.decoding.requests import GenerationRequest, SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens, seed=args.seed,
                              stop_strings=tuple(args.stop), proposal=args.proposal)
    algorithm = algorithms.get(args.mode)
    return GenerationRequest(prompt_ids, algorithm.mode,
                             args.stride if algorithm.drafts else 1, sampling)


def _human(report: dict[str, Any]) -> str:
    stats = report["stats"]
    acceptance = ", ".join("-" if a is None else f"{a:.3f}" for a in stats["acceptance"])
    lines = [report["text"], "", f"--- {report['mode']}"
             + (f" N={report['stride']}" if report["mode"] != "ar" else "")
             + f" | {stats['tokens']} tokens in {stats['forwards']} forwards"
             f" (TPF {stats['tokens_per_forward']:.2f}) | {report['seconds']:.2f} s"
             f" ({report['tokens_per_second']:.1f} tok/s) | finish: {report['finish_reason']}"]
    if report["mode"] != "ar":
        lines.append(f"--- acceptance per draft position: [{acceptance}] | rounds: "
                     f"{stats['full_accept_rounds']} full-accept, {stats['reject_rounds']} "
                     f"reject, {stats['cold_start_rounds']} cold-start")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m idlm.cli.generate``) until ``idlm`` wires it in."""
    parser = argparse.ArgumentParser(prog="idlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
