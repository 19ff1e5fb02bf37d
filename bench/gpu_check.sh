#!/usr/bin/env bash
# The GPU check (outside CI): the CUDA paths CPU-only CI never runs, one line per check.
#   bash bench/gpu_check.sh            # on a machine with a GPU (sets up .venv with `make setup` first)
#   bash bench/gpu_check.sh --smoke    # the same checks on the CPU with a tiny model: checks the script only
# On a GPU machine torch must be a CUDA build: `make setup` installs the CPU wheel, so there run
#   .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
test -x "$PY" || make setup >/dev/null
exec "$PY" bench/gpu_check.py "$@"
