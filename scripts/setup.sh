#!/usr/bin/env bash
# Create .venv and install idlm. torch goes in FIRST and pinned: on the CPU machines
# this takes the CPU build already on disk (pip's find-links); on a GPU cluster the same
# pin takes the CUDA build from PyPI. Installing anything that depends on torch before it
# would pull several GB of CUDA packages onto a CPU machine.
#
# The installer is uv when it installs (1.3 min from a cold cache, bytecode compiled,
# against pip's 3 min here; the same versions); pip otherwise, or with IDLM_INSTALLER=pip. uv does not read
# pip's configuration, so pip's find-links and constraint files are passed to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip)

with_pip() {
  "${PIP[@]}" install -q --upgrade pip
  "${PIP[@]}" install -q torch==2.13.0
  "${PIP[@]}" install -q -e ".[dev]"
}

with_uv() {
  local args=() value
  for value in ${PIP_FIND_LINKS:-} $("${PIP[@]}" config get global.find-links 2>/dev/null || true); do
    args+=(--find-links "$value")
  done
  for value in ${PIP_CONSTRAINT:-} $("${PIP[@]}" config get global.constraint 2>/dev/null || true); do
    [ -f "$value" ] && args+=(--constraint "$value")
  done
  # --compile-bytecode: as pip does; stage processes (PYTHONDONTWRITEBYTECODE is common)
  # would otherwise compile torch and transformers from source at every start.
  .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python "${args[@]}" torch==2.13.0
  .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python "${args[@]}" -e ".[dev]"
}

if [ "${IDLM_INSTALLER:-uv}" = uv ] && "${PIP[@]}" install -q uv 2>/dev/null; then
  with_uv
else
  with_pip
fi
.venv/bin/python -c "import torch, idlm; print(f'idlm installed in .venv (torch {torch.__version__})')"
