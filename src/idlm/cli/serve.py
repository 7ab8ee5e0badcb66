"""``idlm serve``: an OpenAI-compatible server (chat + completions, streaming) over the
batched AR / ISD / R-ISD engine, with continuous batching.

    idlm serve --model outputs/ic/model --mode isd --stride 4 --port 8000
    idlm serve --model outputs/base/model --adapter outputs/lora/adapter --mode risd
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 32}'

Endpoints: /v1/models, /v1/completions, /v1/chat/completions, /metrics, /health.
``usage.decoding`` in every answer holds the request's ISD statistics (tokens per
forward, accepted drafts). Sampling defaults follow OpenAI (temperature 1); send
``"temperature": 0`` for greedy. Stop with Ctrl-C or SIGTERM (in-flight requests get
``--graceful-shutdown`` seconds). Exit status: 0 after a clean stop, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from idlm.systems import SYSTEMS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``idlm`` command's subparsers."""
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (AR, ISD or R-ISD)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model folder with its tokenizer: the IC model for isd, the base "
                             "model for ar and risd")
    parser.add_argument("--adapter", default=None, help="gated LoRA folder (risd only)")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="load an adapter on weights other than those it was trained on "
                             "(experiments: R-ISD then equals AR decoding of these weights)")
    parser.add_argument("--mode", choices=SYSTEMS, default="isd",
                        help="decoding for every request (default isd)")
    parser.add_argument("--stride", type=int, default=4,
                        help="ISD stride N: tokens proposed per forward (default 4)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--served-model-name", default=None,
                        help="the name /v1/models lists and requests use (default: the "
                             "model folder's name)")
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="requests decoded together (default 64)")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="requests queued beyond the batch; one more gets HTTP 429 "
                             "(default 256)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap on a request's max_tokens (default: the context length)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder's layers (compiles on the first "
                             "requests; falls back to eager if compiling fails)")
    parser.add_argument("--graceful-shutdown", type=float, default=10.0, metavar="SECONDS",
                        help="how long in-flight requests may finish on shutdown (default 10)")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(handler=handle_serve)
    return parser


def argument_error(args: argparse.Namespace) -> str | None:
    """Problems visible from the arguments and the file system, before torch is imported
    (only a stride check needs the decoding package, and it comes last)."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        return (f"{model} is not a model folder (no config.json): train it first or point "
                "at a folder saved by save_pretrained")
    if not (model / "tokenizer_config.json").is_file():
        return f"{model} has no tokenizer (tokenizer_config.json): the server needs one"
    if args.mode == "risd" and args.adapter is None:
        return "mode risd needs an adapter: pass --adapter DIR (a gated LoRA folder)"
    if args.mode != "risd" and args.adapter is not None:
        return f"an adapter is only used in mode risd (got mode {args.mode})"
    if args.adapter is not None and not Path(args.adapter).is_dir():
        return f"adapter folder {args.adapter} does not exist"
    checks = [(0 <= args.port <= 65535, f"port {args.port} is not in 0..65535"),
              (args.max_batch_size >= 1, f"--max-batch-size {args.max_batch_size} < 1"),
              (args.max_waiting >= 0, f"--max-waiting {args.max_waiting} < 0"),
              (args.max_new_tokens is None or args.max_new_tokens >= 1,
               f"--max-new-tokens {args.max_new_tokens} < 1"),
              (args.graceful_shutdown >= 0, "--graceful-shutdown must be >= 0")]
    problem = next((message for ok, message in checks if not ok), None)
    if problem is not None or args.mode == "ar":
        return problem
    from idlm.decoding.requests import MAX_STRIDE

    if not 2 <= args.stride <= MAX_STRIDE:
        return f"stride N={args.stride} is invalid for ISD: use 2 <= N <= {MAX_STRIDE}"
    return None


def handle_serve(args: argparse.Namespace) -> int:
    """Validate, load the engine, serve until a signal."""
    problem = argument_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from idlm.decoding.loading import load_engine
    from idlm.decoding.requests import DecodingError
    from idlm.serving.http.server import serve
    from idlm.serving.http.settings import ServerSettings

    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    name = args.served_model_name or Path(args.model).resolve().name
    settings = ServerSettings(
        model_name=name, mode=args.mode, stride=args.stride, host=args.host, port=args.port,
        max_waiting=args.max_waiting, max_new_tokens=args.max_new_tokens,
        graceful_shutdown_s=args.graceful_shutdown, log_level=args.log_level)
    try:
        engine = load_engine(args.model, args.adapter, args.mode, device=args.device,
                             dtype=args.dtype, max_batch_size=args.max_batch_size,
                             allow_other_base=args.allow_other_base, compile=args.compile)
        if settings.max_new_tokens is not None and \
                settings.max_new_tokens > engine.context_length:
            raise DecodingError(f"--max-new-tokens {settings.max_new_tokens} is above the "
                                f"model's context length {engine.context_length}")
    except DecodingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return serve(engine, settings)
