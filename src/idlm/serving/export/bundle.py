"""Servable bundles for SGLang: I-DLM (ISD) and R-ISD, each pinned by a sha256 manifest.

ISD bundle (``outputs/export/isd``): the IC model's safetensors weights, a ``config.json``
whose ``architectures`` is ``SDARForCausalLM`` (a dLLM SGLang's table knows; transformers
still loads it by ``model_type`` qwen3), the tokenizer with ``<|MASK|>``, our algorithm
config (``idlm_algorithm.yaml``: stride N, window 2N-1, MASK id, proposal, seed) and the
exact launch command (``launch.sh``, also in the manifest).

R-ISD bundle (``outputs/export/risd``): ``base.json``, a reference to the base checkpoint
(hub id + revision + fingerprint from the base pin, never a copy of pretrained weights;
the tiny profile's locally trained base is copied into ``base/`` since no hub holds it),
the PEFT gated adapter (``adapter/``), the tokenizer and the algorithm config with the
gate on. SGLang is pointed at the base with ``--json-model-override-args`` so the
unmodified checkpoint is served as ``SDARForCausalLM``.

:func:`load_bundle` is the way back: verify every hash, then build our engine with
transformers (``idlm.decoding.loading.load_engine``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import yaml

from idlm.config.downstream import ExportSection
from idlm.serving.export.manifest import BundleError, verify_bundle, write_manifest
from idlm.serving.sglang import (
    ALGORITHM_CONFIG_FORMAT,
    ALGORITHM_NAME,
    ARCHITECTURE,
    SGLANG_VERSION,
)
from idlm.serving.sglang.compat import config_problems, effective_config, mask_note
from idlm.stage import atomic_dir

ALGORITHM_FILE = "idlm_algorithm.yaml"
LAUNCH_FILE = "launch.sh"
BASE_REFERENCE = "base.json"
ADAPTER_DIR, BASE_DIR, TOKENIZER_DIR = "adapter", "base", "tokenizer"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
BUNDLE_PLACEHOLDER = "{bundle}"   # launch arguments are relative to wherever the bundle lands


def algorithm_config(settings: ExportSection, mask_token_id: int, pad_token_id: int,
                     gate: bool) -> dict[str, Any]:
    """``--dllm-algorithm-config``: read by SGLang (``block_size``) and by our algorithm."""
    return {"format": ALGORITHM_CONFIG_FORMAT, "algorithm": ALGORITHM_NAME,
            "stride": settings.stride, "block_size": 2 * settings.stride - 1,
            "mask_token_id": int(mask_token_id), "pad_token_id": int(pad_token_id),
            "proposal": settings.proposal,
            "seed": settings.seed, "gate": gate, "adapter": ADAPTER_DIR if gate else None}


def launch_argv(settings: ExportSection, model_path: str, tokenizer_path: str,
                revision: str | None = None,
                model_overrides: dict[str, Any] | None = None) -> list[str]:
    """The SGLang server command. ``--no-dllm-fdfo``: ISD commits 1..N tokens a step, which
    only the synchronous commit path takes; ``--max-running-requests``: dLLM mode would
    otherwise serve one request at a time; no radix cache: a window's KV is trimmed."""
    argv = ["python", "-m", "sglang.launch_server", "--model-path", model_path]
    argv += ["--revision", revision] if revision else []
    argv += ["--tokenizer-path", tokenizer_path,
             "--dllm-algorithm", ALGORITHM_NAME,
             "--dllm-algorithm-config", f"{BUNDLE_PLACEHOLDER}/{ALGORITHM_FILE}",
             "--no-dllm-fdfo", "--max-running-requests", str(settings.max_running_requests),
             "--attention-backend", settings.attention_backend, "--disable-radix-cache"]
    if model_overrides:
        argv += ["--json-model-override-args", json.dumps(model_overrides, sort_keys=True)]
    return argv + list(settings.extra_server_args)


def launch_script(argv: list[str]) -> str:
    """``launch.sh``: the command with the bundle's own folder filled in; extra args pass on."""
    lines: list[list[str]] = []
    for word in argv:   # one line per flag and its value
        quoted = shlex.quote(word).replace(BUNDLE_PLACEHOLDER, "'\"$BUNDLE\"'")
        if word.startswith("--") or not lines:
            lines.append([quoted])
        else:
            lines[-1].append(quoted)
    return ("#!/usr/bin/env bash\n# Serve this bundle with SGLang " + SGLANG_VERSION
            + " and the idlm plugin (scripts/setup_serve.sh builds that environment).\n"
            + "set -euo pipefail\nBUNDLE=\"$(cd \"$(dirname \"$0\")\" && pwd)\"\n"
            + "exec " + " \\\n    ".join(" ".join(line) for line in lines) + " \"$@\"\n")


def export_isd(ic_model: Path, tokenizer: Path, out: Path, settings: ExportSection,
               token_ids: tuple[int, int], source: dict[str, Any]) -> dict[str, Any]:
    """Write the I-DLM bundle (full IC weights) atomically; return its manifest.
    ``token_ids``: (MASK id, pad id) of the tokenizer."""
    mask_token_id, pad_token_id = token_ids
    with atomic_dir(out) as staging:
        _place_model_files(ic_model, staging)
        config = json.loads((ic_model / "config.json").read_text())
        config = {**config, "architectures": [ARCHITECTURE], "mask_token_id": mask_token_id}
        # config.json was hard-linked from the IC model: replace the link, never write
        # through it (that would edit the IC model's own file, an upstream DVC output).
        (staging / "config.json").unlink()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_tree(tokenizer, staging)
        algorithm = algorithm_config(settings, mask_token_id, pad_token_id, gate=False)
        _require_servable(config, algorithm, "isd")
        argv = launch_argv(settings, BUNDLE_PLACEHOLDER, BUNDLE_PLACEHOLDER)
        return _finish(staging, "isd", algorithm, argv, config, {"source": source})


def export_risd(base_reference: dict[str, Any], base_model: Path | None, adapter: Path,
                tokenizer: Path, out: Path, settings: ExportSection, token_ids: tuple[int, int],
                source: dict[str, Any]) -> dict[str, Any]:
    """Write the R-ISD bundle atomically. ``base_model`` given: copied into ``base/`` (the
    tiny profile); None: only referenced (hub id + revision + fingerprint)."""
    mask_token_id, pad_token_id = token_ids
    _check_adapter_mask(adapter, mask_token_id)
    with atomic_dir(out) as staging:
        _copy_tree(adapter, staging / ADAPTER_DIR)
        _copy_tree(tokenizer, staging / TOKENIZER_DIR)
        if base_model is not None:
            _copy_tree(base_model, staging / BASE_DIR)
            model_path, revision = f"{BUNDLE_PLACEHOLDER}/{BASE_DIR}", None
            base_config = json.loads((base_model / "config.json").read_text())
        else:
            model_path = base_reference.get("repo_id") or base_reference["path"]
            revision = base_reference.get("commit_sha") or base_reference.get("revision")
            base_config = json.loads((Path(base_reference["path"]) / "config.json").read_text())
        reference = {**base_reference, "in_bundle": BASE_DIR if base_model is not None else None}
        (staging / BASE_REFERENCE).write_text(json.dumps(reference, indent=2, sort_keys=True)
                                              + "\n")
        overrides = {"architectures": [ARCHITECTURE]}
        config = effective_config(base_config, overrides)
        algorithm = algorithm_config(settings, mask_token_id, pad_token_id, gate=True)
        _require_servable(config, algorithm, "risd")
        argv = launch_argv(settings, model_path, f"{BUNDLE_PLACEHOLDER}/{TOKENIZER_DIR}",
                           revision, overrides)
        return _finish(staging, "risd", algorithm, argv, config,
                       {"source": source, "base": {k: reference.get(k) for k in
                                                   ("repo_id", "revision", "commit_sha",
                                                    "fingerprint", "in_bundle")}})


def _finish(staging: Path, kind: str, algorithm: dict[str, Any], argv: list[str],
            config: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    (staging / ALGORITHM_FILE).write_text(yaml.safe_dump(algorithm, sort_keys=True))
    (staging / LAUNCH_FILE).write_text(launch_script(argv))
    os.chmod(staging / LAUNCH_FILE, 0o755)
    sglang = {"version": SGLANG_VERSION, "architecture": config["architectures"][0],
              "algorithm": ALGORITHM_NAME, "block_size": algorithm["block_size"],
              "mask": mask_note(algorithm)}
    return write_manifest(staging, {"kind": kind, "sglang": sglang, "launch": argv,
                                    "algorithm": algorithm, **fields})


def _require_servable(config: dict[str, Any], algorithm: dict[str, Any], kind: str) -> None:
    problems = config_problems(config, algorithm)
    if problems:
        raise BundleError(f"the {kind} bundle would not be served by sglang {SGLANG_VERSION}: "
                          f"{problems[0]}")


def _place_model_files(model: Path, staging: Path) -> None:
    names = sorted(p.name for p in model.iterdir()
                   if p.suffix == ".safetensors" or p.name in MODEL_FILES)
    if not any(name.endswith(".safetensors") for name in names):
        raise BundleError(f"{model} has no safetensors weights: rerun the stage that wrote it")
    for name in names:
        _link_or_copy(model / name, staging / name)


def _copy_tree(source: Path, target: Path) -> None:
    if not source.is_dir():
        raise BundleError(f"{source} not found: rerun the stage that writes it")
    for path in sorted(source.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in
                                      path.relative_to(source).parts):
            _link_or_copy(path, target / path.relative_to(source))


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where possible (weights run to tens of GB), else a copy. Sources are
    never written in place (stages replace whole folders) and a bundle file that differs
    from its source replaces the link instead of writing through it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # a copy over an existing link would write its source
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _check_adapter_mask(adapter: Path, mask_token_id: int) -> None:
    from idlm.model.gated_lora import GATE_FILE

    path = adapter / GATE_FILE
    if not path.is_file():
        raise BundleError(f"{adapter} is not a gated adapter (no {GATE_FILE}): rerun the lora "
                          "stage")
    gate_mask = json.loads(path.read_text()).get("mask_token_id")
    if gate_mask != mask_token_id:
        raise BundleError(f"the adapter gates on MASK id {gate_mask} but the bundle drafts with "
                          f"{mask_token_id}: retrain the adapter or fix model.mask_token_id")


# ---------------------------------------------------------------- the way back
def read_algorithm_config(bundle: Path) -> dict[str, Any]:
    data = yaml.safe_load((bundle / ALGORITHM_FILE).read_text())
    if not isinstance(data, dict) or data.get("format") != ALGORITHM_CONFIG_FORMAT:
        raise BundleError(f"{bundle / ALGORITHM_FILE} is not an {ALGORITHM_CONFIG_FORMAT} "
                          "config: re-export the bundle")
    return data


def base_folder(bundle: Path) -> Path:
    """The R-ISD bundle's base checkpoint: its own copy, or the referenced checkpoint
    resolved again and checked against the recorded fingerprint."""
    reference = json.loads((bundle / BASE_REFERENCE).read_text())
    if reference.get("in_bundle"):
        return bundle / reference["in_bundle"]
    from idlm.model.hub import resolve_checkpoint

    where = reference.get("repo_id") or reference["path"]
    resolved = resolve_checkpoint(where, reference.get("commit_sha") or reference.get("revision")
                                  if reference.get("repo_id") else None)
    if resolved.fingerprint != reference["fingerprint"]:
        raise BundleError(f"base checkpoint {where} has fingerprint {resolved.fingerprint[:12]}, "
                          f"the bundle was made for {reference['fingerprint'][:12]}: fetch the "
                          "pinned revision")
    return resolved.path


def load_bundle(bundle: str | Path, *, device: str = "cpu", dtype: Any = None,
                max_batch_size: int = 64) -> Any:
    """Verify every file's hash, then build the decoding engine the bundle describes."""
    from idlm.decoding.loading import load_engine

    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    mask = int(read_algorithm_config(bundle)["mask_token_id"])
    if manifest["kind"] == "isd":
        return load_engine(bundle, mode="isd", device=device, dtype=dtype, mask_token_id=mask,
                           max_batch_size=max_batch_size)
    return load_engine(base_folder(bundle), bundle / ADAPTER_DIR, mode="risd", device=device,
                       dtype=dtype, mask_token_id=mask, max_batch_size=max_batch_size)
