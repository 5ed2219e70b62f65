#!/usr/bin/env bash
# The CUDA check, for a session whose task is lent the GPU machine (the `device` tool: an H200 that
# reaches no package registry; its python3 3.12 has torch for CUDA 13, the CUDA 13 and cuDNN 9
# libraries, and the CPU onnxruntime). DESIGN.md, "Checking the CUDA path", gives the calls in order.
#
#   bash scripts/cuda_check.sh prepare    here: the wheels, and onnxruntime-gpu cut to sm_90 kernels,
#                                         in parts under .cuda/ (ignored), each part fit for one call
#   bash scripts/cuda_check.sh slim       here: take the embedded models and training text (68 MiB)
#                                         out of the index, so that the copy a call sends is ~5 MiB
#   bash scripts/cuda_check.sh restore    here: undo slim (do it before any commit)
#   bash scripts/cuda_check.sh device     there: install, then tests/test_cuda.py and
#                                         benchmarks/cuda_bench.py, logs and results into $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}   # the device machine's python3 (its version, for the wheels)
DPY=${DEVICE_PY:-python3}              # the device machine's python3 (its command)
ORT_GPU=onnxruntime-gpu==1.31.1   # built for CUDA 13 (libcublas.so.13, libcudart.so.13)
SLIM_PATHS=(edgelm/assets/models benchmarks/data)

# transformers, tokenizers and huggingface_hub at the versions of this venv: the device has
# transformers 5 and huggingface_hub 1, which the export (transformers<4.58) does not take.
wheels() {
    "$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("transformers", "tokenizers", "huggingface_hub")))
EOF
}

prepare() {
    local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    mkdir -p .cuda/download .cuda/wheels
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
        "${plat[@]}" -d .cuda/download "$ORT_GPU" || exit 1
    # shellcheck disable=SC2046
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
        "${plat[@]}" -d .cuda/wheels $(wheels) || exit 1
    "$PY" scripts/cuda_payload.py pack .cuda/download/onnxruntime_gpu-*.whl .cuda --sm 90 --part-mib 30 || exit 1
    du -sh .cuda/ort-gpu.tar.xz.* .cuda/wheels
}

slim() {
    for p in "${SLIM_PATHS[@]}"; do
        git rm -r -q --cached "$p" && echo "/$p/" >> .git/info/exclude
    done
    echo "slim: ${SLIM_PATHS[*]} are out of the index (still on disk); run 'bash scripts/cuda_check.sh restore' before committing"
    git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "the copy a call sends: %.1f MiB (a call carries 64 MiB)\n", $1 / 2^20}'
}

restore() {
    git reset -q -- "${SLIM_PATHS[@]}"
    for p in "${SLIM_PATHS[@]}"; do
        grep -vxF "/$p/" .git/info/exclude > .git/info/exclude.new; mv .git/info/exclude.new .git/info/exclude
    done
    git status --short -- "${SLIM_PATHS[@]}"
    echo "restored"
}

device() {
    local out=${OUT:-/tmp/edgelm-cuda} site=/tmp/edgelm-site rc
    mkdir -p "$out"
    $DPY scripts/cuda_payload.py unpack .cuda "$site" || exit 1
    $DPY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .cuda/wheels/*.whl || exit 1
    export PYTHONPATH="$site:$PWD" EDGELM_REQUIRE_CUDA=1 PYTHONUNBUFFERED=1
    LD_LIBRARY_PATH="$($DPY scripts/cuda_payload.py libpath)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1
    $DPY -c "import onnxruntime as o, torch, transformers as t
print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())
print('torch', torch.__version__, torch.cuda.is_available(), 'transformers', t.__version__)" 2>&1 | tee "$out/versions.txt"
    $DPY -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log"
    rc=${PIPESTATUS[0]}
    $DPY benchmarks/cuda_bench.py --out "$out/cuda.json" "$@" 2>&1 | tee "$out/cuda_bench.log"
    [ "$rc" -eq 0 ] && rc=${PIPESTATUS[0]}
    exit "$rc"
}

case "${1:-}" in
    prepare|slim|restore) "$1" ;;
    device) shift; device "$@" ;;
    *) echo "usage: bash scripts/cuda_check.sh prepare|slim|restore|device [cuda_bench.py arguments]" >&2; exit 2 ;;
esac
