#!/usr/bin/env bash
# Creates .venv and installs edgelm with every extra the tests and the demo use (CPU build of
# ONNX Runtime and torch). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints/ci.txt -e ".[cpu,export,optimum,quantize,bench,dev]"
