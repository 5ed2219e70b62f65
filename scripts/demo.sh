#!/usr/bin/env bash
# One command on a fresh machine: set up, export the embedded GPT-2 and GPT-Neo (validated against
# PyTorch), generate from them with the ONNX Runtime loop, and end with the benchmark report of the
# embedded GPT-2 against PyTorch, Optimum and CTranslate2 (speed, memory, size, energy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-out}
.venv/bin/edgelm export embedded:gpt2 -o "$OUT/gpt2" --force
.venv/bin/edgelm generate "$OUT/gpt2" "It was a truth universally acknowledged, that" -n 48 --ignore-eos
.venv/bin/edgelm export embedded:gpt-neo -o "$OUT/gpt-neo" --force
.venv/bin/edgelm generate "$OUT/gpt-neo" "Emma Woodhouse, handsome, clever, and rich," -n 48 --json --ignore-eos \
    | .venv/bin/python -c "import json,sys; r=json.load(sys.stdin); print(r['prompt'] + r['text']); print(r['timings'])"
.venv/bin/edgelm bench "$OUT/gpt2" --vs pytorch,optimum,ctranslate2 --new-tokens 64 --repeats 3 \
    -o "$OUT/report" --force
echo "benchmark report: $OUT/report/report.md (data: report.json; charts: decode_speed.png, energy_per_token.png, size.png)"
