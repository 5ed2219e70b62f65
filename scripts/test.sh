#!/usr/bin/env bash
# One command: set up (scripts/setup.sh) and run the whole test suite.
# pytest's exit code passes through unchanged, 5 (no tests collected) included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
