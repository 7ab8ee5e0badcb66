"""The ``export`` stage: write both bundles, prove they load back, register them.

Reads ``outputs/ic/model``, ``outputs/lora/adapter``, ``outputs/base/base.json`` (+
``outputs/base/model``) and ``outputs/prepare/tokenizer``; writes ``outputs/export/isd``,
``outputs/export/risd``, ``registry.json`` (the registry versions the gate promotes) and
``metrics.json`` (sizes, hashes, the round-trip check, the versions).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from idlm.config import Config
from idlm.errors import StageError
from idlm.stage import write_json_atomic

# Short questions in the formats the tiny corpus covers; only their greedy continuations
# are compared (source model vs bundle), so any text works.
CHECK_QUESTIONS = ("What is 12+7?", "What is 3*14-5?", "Write a Python function that "
                   "returns the square of x.", "Name a prime number greater than 10.",
                   "Answer in one word: is 17 odd?", "What is 100-58?")


def run(cfg: Config) -> dict[str, Any]:
    from idlm.serving.export import bundle as export
    from idlm.serving.export.manifest import manifest_sha256

    began = time.perf_counter()
    inputs = _inputs(cfg)
    settings = cfg.export
    mask, pad = _token_ids(cfg, inputs)
    source = {"ic_model": str(inputs["ic"]), "base_fingerprint": inputs["pin"]["fingerprint"]}
    bundles = {"isd": cfg.out("export", "isd"), "risd": cfg.out("export", "risd")}
    manifests = {
        "isd": export.export_isd(inputs["ic"], inputs["tokenizer"], bundles["isd"], settings,
                                 (mask, pad), source),
        "risd": export.export_risd(_base_reference(cfg, inputs), _base_copy(inputs),
                                   inputs["adapter"], inputs["tokenizer"], bundles["risd"],
                                   settings, (mask, pad), source),
    }
    checks = _round_trip(cfg, inputs, bundles) if cfg.export.check_prompts else {}
    hashes = {kind: manifest_sha256(folder) for kind, folder in bundles.items()}
    registered = _register(cfg, bundles, hashes, manifests)
    write_json_atomic(cfg.out("export", "registry.json"), {"registered": registered})
    metrics = {kind: {"bytes": manifests[kind]["total_bytes"],
                      "files": len(manifests[kind]["files"]), "manifest_sha256": hashes[kind],
                      **checks.get(kind, {})} for kind in bundles}
    metrics.update({"sglang_version": manifests["isd"]["sglang"]["version"],
                    "stride": settings.stride, "mask_token_id": mask,
                    "registered": {entry["name"]: entry["version"] for entry in registered},
                    "seconds": round(time.perf_counter() - began, 2)})
    write_json_atomic(cfg.out("export", "metrics.json"), metrics)
    return metrics


def _inputs(cfg: Config) -> dict[str, Any]:
    paths = {"ic": cfg.out("ic", "model"), "adapter": cfg.out("lora", "adapter"),
             "tokenizer": cfg.out("prepare", "tokenizer"), "pin": cfg.out("base", "base.json")}
    for name, path in paths.items():
        if not path.exists():
            stage = {"ic": "ic", "adapter": "lora", "tokenizer": "prepare", "pin": "base"}[name]
            raise StageError(f"export: {path} not found: run `dvc repro {stage}` first")
    pin = json.loads(paths["pin"].read_text())
    base = cfg.out(pin["path"]) if pin["kind"] == "tiny" else Path(pin["path"])
    if not (base / "config.json").is_file():
        raise StageError(f"export: base model folder {base} is missing: rerun `dvc repro base`")
    return {**paths, "pin": pin, "base": base}


def _token_ids(cfg: Config, inputs: dict[str, Any]) -> tuple[int, int]:
    """(MASK id every source agrees on: the config, the base pin, the tokenizer; pad id)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(inputs["tokenizer"]))
    candidates = {"model.mask_token_id": cfg.model.mask_token_id,
                  "base.json": inputs["pin"].get("mask_token_id"),
                  f"{inputs['tokenizer']} ({cfg.prepare.tokenizer.mask_token})":
                      tokenizer.convert_tokens_to_ids(cfg.prepare.tokenizer.mask_token)}
    known = {name: value for name, value in candidates.items() if value is not None}
    if len(set(known.values())) != 1:
        raise StageError(f"export: the MASK id differs between sources ({known}): make "
                         "model.mask_token_id, the base pin and the tokenizer agree")
    mask = int(next(iter(known.values())))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if pad == mask:
        raise StageError("export: the tokenizer's pad id is the MASK id: give it a pad token")
    return mask, int(pad)


def _base_reference(cfg: Config, inputs: dict[str, Any]) -> dict[str, Any]:
    pin = inputs["pin"]
    if pin["kind"] == "tiny":
        return {"kind": "tiny", "path": str(inputs["base"]), "fingerprint": pin["fingerprint"]}
    keys = ("kind", "path", "source", "repo_id", "revision", "commit_sha", "fingerprint", "files")
    return {key: pin.get(key) for key in keys}


def _base_copy(inputs: dict[str, Any]) -> Path | None:
    """Tiny bases exist only here, so they travel in the bundle; hub bases are referenced."""
    return inputs["base"] if inputs["pin"]["kind"] == "tiny" else None


def _round_trip(cfg: Config, inputs: dict[str, Any], bundles: dict[str, Path]
                ) -> dict[str, dict[str, Any]]:
    """Greedy ISD / R-ISD output of each bundle, loaded back, equals its source's."""
    from idlm.decoding.loading import load_engine
    from idlm.serving.export.bundle import load_bundle

    dtype = cfg.model.dtype
    prompts = check_prompts(inputs["tokenizer"], cfg.export.check_prompts)
    sources = {"isd": load_engine(inputs["ic"], mode="isd", dtype=dtype),
               "risd": load_engine(inputs["base"], inputs["adapter"], mode="risd", dtype=dtype)}
    results = {}
    for kind, folder in bundles.items():
        before = greedy_outputs(sources[kind], prompts, cfg.export.stride,
                                cfg.export.check_new_tokens)
        after = greedy_outputs(load_bundle(folder, dtype=dtype), prompts, cfg.export.stride,
                               cfg.export.check_new_tokens)
        matched = sum(a == b for a, b in zip(before, after, strict=True))
        if matched != len(prompts):
            first = next(i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b)
            raise StageError(f"export: the {kind} bundle's greedy output differs from its "
                             f"source on prompt {first} ({before[first][:8]} vs "
                             f"{after[first][:8]}...): the bundle is not the trained model")
        results[kind] = {"round_trip_prompts": len(prompts), "round_trip_matched": matched}
    return results


def check_prompts(tokenizer_dir: Path, count: int) -> list[list[int]]:
    """``count`` chat-formatted prompts (token ids), cycling through the fixed questions."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    questions = [CHECK_QUESTIONS[i % len(CHECK_QUESTIONS)] for i in range(count)]
    if tokenizer.chat_template:
        return [list(tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"]) for q in questions]
    return [tokenizer(q)["input_ids"] for q in questions]


def greedy_outputs(engine: Any, prompts: list[list[int]], stride: int, max_new_tokens: int
                   ) -> list[list[int]]:
    from idlm.decoding.requests import GenerationRequest, SamplingParams

    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    results = engine.generate([GenerationRequest(p, mode="isd", stride=stride, sampling=sampling)
                               for p in prompts])
    for result in results:
        if not result.ok:
            raise StageError(f"export: round-trip decoding failed: {result.error}")
    return [result.token_ids for result in results]


def _register(cfg: Config, bundles: dict[str, Path], hashes: dict[str, str],
              manifests: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each bundle as a new version of its registered model (the gate moves the alias)."""
    from idlm import tracking
    from idlm.config import workspace

    registry = cfg.export.registry
    if not registry.enabled:
        return []
    names = {"isd": registry.isd, "risd": registry.risd}
    registered = []
    for kind, folder in bundles.items():
        tags = {"kind": kind, "manifest_sha256": hashes[kind], "profile": cfg.profile,
                "stride": str(cfg.export.stride),
                "sglang_version": manifests[kind]["sglang"]["version"]}
        version = tracking.register_bundle(names[kind], folder, workspace=workspace(),
                                           upload=registry.upload, tags=tags,
                                           description=f"idlm {kind} bundle ({cfg.profile})")
        registered.append({"name": names[kind], "version": version, "kind": kind,
                           "manifest_sha256": hashes[kind]})
    return registered
