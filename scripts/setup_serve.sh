#!/usr/bin/env bash
# The GPU server's environment for SGLang + the idlm plugin (ISD / R-ISD bundles).
# SGLang 0.5.21 pins transformers 5.12.1 and the training environment pins 5.23.0, so
# the server gets its own venv: the `serve` extra's pins (read from pyproject.toml)
# first, with their own dependencies, then idlm without dependencies (the plugin needs
# only torch and pyyaml, both there), then our algorithm module written into
# sglang/srt/dllm/algorithm/ (the plugin entry point also does this at server start).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-serve}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
mapfile -t PINS < <("$VENV/bin/python" -c '
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["serve"]))')
"$VENV/bin/python" -m pip install -q "${PINS[@]}"
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m idlm.serving.sglang.install
"$VENV/bin/python" - <<'PY'
from importlib.metadata import entry_points
names = [ep.name for ep in entry_points(group="sglang.srt.plugins")]
assert "idlm_isd" in names, f"plugin entry point missing: {names}"
import sglang
print(f"sglang {sglang.__version__} with the idlm plugin ready; serve a bundle with its launch.sh")
PY
