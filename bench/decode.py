"""Decoding throughput: engine AR vs ISD vs R-ISD at batch 1, 4, 16 and 64, and the engine's
AR vs transformers ``generate``, side by side in one run. Prints JSON, writes a PNG.

    python bench/decode.py                      # outputs/{ic/model,base/model,lora/adapter}
    python bench/decode.py --random-tiny        # random tiny-profile models, no training needed
    python bench/decode.py --compile            # also the torch.compile'd engines
    python bench/decode.py --dtype bfloat16     # every engine in bf16 (oneDNN; AMX if any)

Systems: ``hf_generate`` (base, batched, left-padded), ``ar`` (engine, base), ``isd``
(engine, IC model, stride N) and ``risd`` (engine, base + gated adapter). Every system
decodes the same prompts with the same budget and stop ids; each (system, batch) cell is
timed ``--repeats`` times after a warm-up, interleaved, and the fastest run is kept (the
machine may be shared). A cell decodes at least ``--min-prompts`` different prompts, in
consecutive batches of its size (batch 1: one prompt after another), so that a small batch
is not one prompt's luck. Tokens/s counts generated tokens (stop token included) per second
of wall time over the whole batch. ``ms_per_step_forward`` is an engine system's cost per
decode-step forward, prefill excluded (a 1-token run's time and forwards subtracted).
``cpu_matmul`` lists which CPU library each weight shape and row bucket took
(``idlm.decoding.cpu_matmul``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("hf_generate", "ar", "isd", "risd")
COMPILED = "_compiled"   # the suffix of the engines built with --compile


def systems(engines: dict[str, Any]) -> list[str]:
    """The systems timed: SYSTEMS, then the compiled engines when there are any."""
    return [*SYSTEMS, *(name for name in engines if name.endswith(COMPILED))]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/ic/model", help="IC model (ISD)")
    parser.add_argument("--base", default="outputs/base/model", help="base model (AR, R-ISD)")
    parser.add_argument("--adapter", default="outputs/lora/adapter", help="gated LoRA (R-ISD)")
    parser.add_argument("--prompts", default="outputs/prepare/eval_items.jsonl",
                        help="JSONL rows with 'prompt' (text, chat-templated) or 'prompt_ids'; "
                             "random token prompts if absent")
    parser.add_argument("--random-tiny", action="store_true",
                        help="bench random tiny-profile models (acceptance ~0: TPF ~1)")
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="only for model folders without a tokenizer")
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-prompts", type=int, default=16,
                        help="prompts per cell at least (small batches run several in turn)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights, activations and KV cache of every engine (bf16 runs "
                             "on oneDNN: AMX where the CPU has it)")
    parser.add_argument("--compile", action="store_true",
                        help="also time ar, isd and risd engines whose dense maths are "
                             "torch.compile'd (ar_compiled, ...), side by side")
    parser.add_argument("--plot", default="outputs/bench/decode.png")
    return parser.parse_args(argv)


def resolve(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else REPO / candidate


def load_systems(args: argparse.Namespace, folders: dict[str, Path], mask: int | None
                 ) -> dict[str, Any]:
    from idlm.decoding.loading import load_engine

    engines = {}
    for suffix in ("", COMPILED)[:2 if args.compile else 1]:
        compile = suffix == COMPILED
        engines |= {
            f"ar{suffix}": load_engine(folders["base"], mode="ar", mask_token_id=mask,
                                       dtype=args.dtype, compile=compile),
            f"isd{suffix}": load_engine(folders["model"], mode="isd", mask_token_id=mask,
                                        dtype=args.dtype, compile=compile),
            f"risd{suffix}": load_engine(folders["base"], folders["adapter"], mode="risd",
                                         mask_token_id=mask, dtype=args.dtype,
                                         compile=compile)}
    return engines


def make_prompts(args: argparse.Namespace, engine: Any, count: int) -> list[list[int]]:
    """Chat-templated eval prompts when there is a tokenizer and a prompt file, else random."""
    import torch

    path = resolve(args.prompts)
    if path.is_file() and not args.random_tiny:
        from idlm.cli.generate import encode_prompt

        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and all("prompt_ids" in row for row in rows):
            return [list(row["prompt_ids"]) for row in rows][:count]
        if engine.tokenizer is not None:
            return [encode_prompt(engine.tokenizer, row["prompt"], True) for row in rows][:count]
    generator = torch.Generator().manual_seed(0)
    specials = {engine.mask_token_id, engine.pad_token_id, *engine.stop_token_ids}
    low = max(specials) + 1 if max(specials) < 64 else 0
    prompts = []
    for _ in range(count):
        length = int(torch.randint(24, 41, (1,), generator=generator))
        ids = torch.randint(low, engine.vocab_size, (length,), generator=generator).tolist()
        prompts.append([t for t in ids if t not in specials] or [low])
    return prompts


def run_engine(engine: Any, groups: list[list[list[int]]], mode: str, stride: int,
               max_new_tokens: int) -> dict[str, Any]:
    """One timed ``generate`` per batch in ``groups``, then 1-token ones (the prefill forward
    alone) so that the decode steps' forward cost can be reported without the prefill."""
    from idlm.decoding import GenerationRequest, SamplingParams, aggregate

    def timed(budget: int) -> tuple[float, int, list[Any]]:
        sampling = SamplingParams(max_new_tokens=budget)
        seconds, before, results = 0.0, engine.forwards_run, []
        for prompts in groups:
            requests = [GenerationRequest(p, mode, stride if mode == "isd" else 1, sampling)
                        for p in prompts]
            started = time.perf_counter()
            results += engine.generate(requests)
            seconds += time.perf_counter() - started
        return seconds, engine.forwards_run - before, results

    seconds, forwards, results = timed(max_new_tokens)
    prefill_seconds, prefill_forwards, _ = timed(1)
    summary = aggregate(r.stats for r in results)
    return {"seconds": seconds, "tokens": summary["tokens"], "batch_forwards": forwards,
            "ms_per_step_forward": 1e3 * max(0.0, seconds - prefill_seconds)
            / max(1, forwards - prefill_forwards),
            "tokens_per_forward": summary["tokens_per_forward"],
            "acceptance": summary["acceptance"]}


def run_transformers(engine: Any, groups: list[list[list[int]]], max_new_tokens: int
                     ) -> dict[str, Any]:
    """Batched ``generate`` on the base model per batch in ``groups``, left-padded, same
    budget and stop ids."""
    runs = [_transformers_batch(engine, prompts, max_new_tokens) for prompts in groups]
    total = {key: sum(run[key] for run in runs)
             for key in ("seconds", "tokens", "batch_forwards", "slots")}
    return {"seconds": total["seconds"], "tokens": total["tokens"],
            "batch_forwards": total["batch_forwards"],
            "tokens_per_forward": total["tokens"] / max(1, total["slots"]), "acceptance": []}


def _transformers_batch(engine: Any, prompts: list[list[int]], max_new_tokens: int
                        ) -> dict[str, Any]:
    import torch

    width = max(map(len, prompts))
    pad = engine.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, attention_mask=attention, do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=pad,
                                    eos_token_id=engine.stop_token_ids or None,
                                    top_k=None, top_p=None, temperature=None)
    seconds = time.perf_counter() - started
    tokens = 0
    for row in out[:, width:].tolist():
        stops = [i for i, t in enumerate(row) if t in engine.stop_token_ids]
        tokens += stops[0] + 1 if stops else len(row)
    steps = out.shape[1] - width
    return {"seconds": seconds, "tokens": tokens, "batch_forwards": steps,
            "slots": steps * len(prompts)}


def batches(prompts: list[list[int]], size: int, least: int) -> list[list[list[int]]]:
    """Consecutive batches of ``size`` prompts covering at least ``least`` prompts."""
    rounds = max(1, -(-least // size))
    cycled = (prompts * (-(-rounds * size // len(prompts))))[:rounds * size]
    return [cycled[start:start + size] for start in range(0, len(cycled), size)]


def measure(engines: dict[str, Any], groups: list[list[list[int]]], args: argparse.Namespace
            ) -> dict[str, dict[str, Any]]:
    """Best of ``repeats`` interleaved runs per system for one batch size."""
    def engine_run(name: str) -> dict[str, Any]:
        mode, stride = ("ar", 1) if name.startswith("ar") else ("isd", args.stride)
        return run_engine(engines[name], groups, mode, stride, args.max_new_tokens)

    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for name in systems(engines):
            run = (run_transformers(engines["ar"], groups, args.max_new_tokens)
                   if name == "hf_generate" else engine_run(name))
            if name not in best or run["seconds"] < best[name]["seconds"]:
                best[name] = run
    for run in best.values():
        run["tokens_per_second"] = run["tokens"] / run["seconds"]
        run["ms_per_batch_forward"] = 1e3 * run["seconds"] / max(1, run["batch_forwards"])
    return best


def random_tiny_folders(root: Path) -> tuple[dict[str, Path], int]:
    """Random tiny-profile base (= IC) model and a gated adapter with non-zero B."""
    import torch

    from idlm.config import LoraSection, TinyArchitecture
    from idlm.model.adapter_files import base_fingerprint, save_gated_lora
    from idlm.model.factory import build_tiny
    from idlm.model.gated_lora import attach_gated_lora

    vocab, pad, eos, mask = 2048, 0, 2, 5
    model = build_tiny(TinyArchitecture(), vocab, pad, eos, 1024, seed=0)
    model.save_pretrained(root / "base")
    model.save_pretrained(root / "ic")
    lora = LoraSection()
    adapter = attach_gated_lora(build_tiny(TinyArchitecture(), vocab, pad, eos, 1024, seed=0),
                                mask, lora.rank, lora.alpha, 0.0)
    torch.manual_seed(1)
    for name, parameter in adapter.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    save_gated_lora(adapter, root / "adapter", base_fingerprint(adapter, weights_dir=root / "base"))
    return {"model": root / "ic", "base": root / "base", "adapter": root / "adapter"}, mask


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(b) for b in report["results"]]
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in next(iter(report["results"].values())):
        axis.plot(sizes, [report["results"][str(b)][name]["tokens_per_second"] for b in sizes],
                  marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(b) for b in sizes])
    axis.set(xlabel="batch (concurrent requests)", ylabel="generated tokens / s",
             title=f"decoding throughput ({report['models']}, N={report['stride']})")
    axis.grid(alpha=0.3)
    axis.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folders = {"model": resolve(args.model), "base": resolve(args.base),
               "adapter": resolve(args.adapter)}
    missing = [f"{name} {path}" for name, path in folders.items() if not path.exists()]
    if missing and not args.random_tiny:
        print(f"error: not found: {', '.join(missing)}; run `dvc repro ic lora` first "
              "(or pass --random-tiny)", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # Libraries print notices on stdout while loading; keep stdout for the JSON alone.
    from idlm.decoding import DecodingError, cpu_matmul

    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        mask = args.mask_token_id
        if args.random_tiny:
            folders, mask = random_tiny_folders(Path(scratch))
        try:
            engines = load_systems(args, folders, mask)
        except DecodingError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        prompts = make_prompts(args, engines["ar"], max(max(sizes), args.min_prompts))
        measure(engines, [prompts[:1]], argparse.Namespace(**{**vars(args), "repeats": 1}))
        results = {str(b): measure(engines, batches(prompts, b, args.min_prompts), args)
                   for b in sizes}
        # What each engine computed in (its KV cache's dtype is its weights').
        dtypes = {name: str(engine.cache_dtype).removeprefix("torch.")
                  for name, engine in engines.items()}
    report = {"models": "random tiny" if args.random_tiny else str(folders["model"]),
              "stride": args.stride, "max_new_tokens": args.max_new_tokens,
              "dtype": args.dtype, "engine_dtypes": dtypes,
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "min_prompts": args.min_prompts,
              "results": results, "ratios": ratios(results),
              "cpu_matmul": cpu_matmul.chosen()}
    plot(report, resolve(args.plot))
    report["plot"] = str(resolve(args.plot))
    print(json.dumps(report, indent=2))
    return 0


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    def ratio(top: str, bottom: str) -> dict[str, float]:
        return {b: round(r[top]["tokens_per_second"] / r[bottom]["tokens_per_second"], 3)
                for b, r in results.items()}

    def cost(top: str, bottom: str) -> dict[str, float]:
        return {b: round(r[top]["ms_per_step_forward"] / r[bottom]["ms_per_step_forward"], 3)
                for b, r in results.items()}

    # Tokens/s ratios, then per-forward cost ratios of the decode steps (prefill excluded).
    found = {"isd_over_ar": ratio("isd", "ar"), "risd_over_ar": ratio("risd", "ar"),
             "ar_over_hf_generate": ratio("ar", "hf_generate"),
             "step_forward_cost_isd_over_ar": cost("isd", "ar"),
             "step_forward_cost_risd_over_isd": cost("risd", "isd")}
    if f"ar{COMPILED}" in next(iter(results.values())):   # --compile: the same, compiled
        ar, isd, risd = (f"{name}{COMPILED}" for name in ("ar", "isd", "risd"))
        found |= {"compiled_isd_over_compiled_ar": ratio(isd, ar),
                  "compiled_risd_over_compiled_ar": ratio(risd, ar),
                  "step_forward_cost_compiled_isd_over_compiled_ar": cost(isd, ar),
                  **{f"{name}_compiled_over_eager": ratio(f"{name}{COMPILED}", name)
                     for name in ("ar", "isd", "risd")}}
    return found


if __name__ == "__main__":
    sys.exit(main())
