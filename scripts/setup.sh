#!/usr/bin/env bash
# Create .venv and install idlm. torch goes in FIRST and pinned: on the CPU machines
# this takes the CPU build already on disk; on a GPU cluster the same pin takes the
# CUDA build from PyPI. Installing anything that depends on torch before it would
# pull several GB of CUDA packages onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
echo "idlm installed in .venv"
