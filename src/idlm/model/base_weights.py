"""Bind a gated adapter to the exact base weights it was trained on.

R-ISD is lossless against the base whose rows the gate leaves untouched: an adapter
loaded on other weights (the IC model, another revision) still decodes, but "equals the
base" then means another base. So the adapter's ``idlm_gate.json`` records a sha256 over
the base's weight files, and every loader compares it with the weights it was handed
before anything heavy loads.

Kept apart from :mod:`idlm.model.adapter_files` (which needs peft) because the SGLang
plugin makes the same check in a server environment that has torch and pyyaml only:
this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

# The field of the adapter's base fingerprint that holds the weights hash.
WEIGHTS_FIELD = "weights_sha256"
GATE_FILE = "idlm_gate.json"  # written by idlm.model.adapter_files.save_gated_lora
WEIGHTS_SUFFIX = ".safetensors"
OVERRIDE_FLAG = "--allow-other-base"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_BYTES = 8 * 1024 * 1024


class BaseWeightsError(ValueError):
    """An adapter offered to weights it was not trained on, as one line saying what to do."""


def weights_fingerprint(model_dir: str | Path, known: Mapping[str, str] | None = None) -> str:
    """One sha256 over the sorted ``name<TAB>sha256`` lines of the folder's weight files.

    ``known``: digests already computed (a hub pin's ``files``), used instead of reading
    the file again. Files in the HF cache are symlinks to blobs named by their sha256,
    which is used as is, so pinning or loading a 16 GB hub checkpoint does not re-hash it.
    """
    model_dir = Path(model_dir)
    names = sorted(path.name for path in model_dir.glob(f"*{WEIGHTS_SUFFIX}"))
    if not names:
        raise BaseWeightsError(f"{model_dir} holds no {WEIGHTS_SUFFIX} weights: point at a "
                               "model folder saved by save_pretrained")
    digests = {name: _digest(model_dir / name, (known or {}).get(name)) for name in names}
    manifest = "".join(f"{name}\t{digests[name]}\n" for name in names)
    return hashlib.sha256(manifest.encode()).hexdigest()


def _digest(path: Path, known: str | None) -> str:
    if known and _SHA256.match(known):
        return known
    blob = path.resolve().name
    if path.is_symlink() and _SHA256.match(blob):
        return blob
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_weights(adapter_dir: str | Path) -> str | None:
    """The weights hash an adapter folder records, or None if it records none."""
    path = Path(adapter_dir) / GATE_FILE
    try:
        record = json.loads(path.read_text())
        return record["base_fingerprint"].get(WEIGHTS_FIELD)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise BaseWeightsError(f"{path} is missing or corrupt: re-run the lora stage") from None


def check_adapter_base(adapter_dir: str | Path, model_dir: str | Path, *,
                       allow_other_base: bool = False) -> str:
    """Refuse (one line) an adapter whose recorded base weights are not ``model_dir``'s.

    With ``allow_other_base`` a mismatch is only reported, on stderr, saying what
    losslessness then means. Returns the hash of the weights in ``model_dir``.
    """
    recorded = recorded_weights(adapter_dir)
    actual = weights_fingerprint(model_dir)
    if recorded == actual:
        return actual
    found = f"recorded base weights {recorded[:12]}" if recorded else "no base weights hash"
    if allow_other_base:
        print(f"warning: adapter {adapter_dir} has {found}, {model_dir} holds {actual[:12]} "
              f"({OVERRIDE_FLAG}): R-ISD output equals AR decoding of the weights given, not of "
              "the base the adapter was trained on", file=sys.stderr)
        return actual
    raise BaseWeightsError(
        f"adapter {adapter_dir} has {found} but {model_dir} holds weights {actual[:12]}: load it "
        f"on the base it was trained on (the lora stage's base model), retrain it on this one, "
        f"or pass {OVERRIDE_FLAG} to experiment")
