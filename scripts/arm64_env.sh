#!/usr/bin/env bash
# Sets up an emulated 64-bit ARM Linux for benchmarks/arm64_check.py, under benchmarks/.cache/arm64:
#   qemu/        qemu-user 9 or newer: the system's when it is that new, else Debian 12's backport
#                (10.0). Older ones fail here: qemu 7.2 hands the host's x86 /proc/cpuinfo to ARM
#                programs (ONNX Runtime's CPU detection crashes on it) and computes some SME
#                instructions wrongly (ONNX Runtime's int8 matmul on its `max` CPU gave perplexity
#                517891 instead of 230, results/arm64-check-qemu7.2.md; qemu 10.0 gets it right)
#   root/        Debian's arm64 Python 3.11 and the libraries it and ONNX Runtime load (apt-get download)
#   site/        the aarch64 wheels of the packages the runtime and its native tests need, at the
#                versions .venv has (numpy, onnxruntime, onnx, tokenizers, pytest)
#   zig/         a venv with ziglang, whose `zig cc` cross-compiles edgelm's operator library
#   bin/python3  runs root's Python under that qemu-aarch64
# Needs Debian (or Ubuntu with a qemu-user of 9 or newer), root for apt and dpkg, and the package
# registries. Safe to run again: it only fetches what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
ARM=benchmarks/.cache/arm64
mkdir -p "$ARM/bin"
ARM=$(cd "$ARM" && pwd)

qemu_major() { "$1" --version 2>/dev/null | head -1 | sed -E 's/.*version ([0-9]+).*/\1/'; }
if [ ! -x "$ARM/qemu/qemu-aarch64" ]; then
    mkdir -p "$ARM/qemu"
    system=$(command -v qemu-aarch64 || true)
    if [ -n "$system" ] && [ "$(qemu_major "$system")" -ge 9 ]; then
        ln -sf "$system" "$ARM/qemu/qemu-aarch64"
    else
        if ! apt-cache policy qemu-user | grep -q bpo12; then
            echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/edgelm-backports.list
            apt-get update -q >/dev/null
        fi
        rm -rf "$ARM/qemu-deb" && mkdir -p "$ARM/qemu-deb"
        (cd "$ARM/qemu-deb" && apt-get download -q -t bookworm-backports qemu-user >/dev/null 2>&1)
        dpkg -x "$ARM"/qemu-deb/qemu-user_*.deb "$ARM/qemu-deb/x"
        mv "$ARM/qemu-deb/x/usr/bin/qemu-aarch64" "$ARM/qemu/qemu-aarch64"  # static: no libraries to bring
        rm -rf "$ARM/qemu-deb"
    fi
fi
major=$(qemu_major "$ARM/qemu/qemu-aarch64")
if [ "${major:-0}" -lt 9 ]; then
    echo "qemu-aarch64 $major is too old (9 or newer needed; see the top of this script)" >&2
    exit 1
fi

if [ ! -x "$ARM/root/usr/bin/python3.11" ]; then
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    apt-get update -q >/dev/null
    rm -rf "$ARM/debs" && mkdir -p "$ARM/debs"
    (cd "$ARM/debs" && apt-get download -q python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
        libpython3.11-stdlib:arm64 libc6:arm64 libexpat1:arm64 zlib1g:arm64 libffi8:arm64 libssl3:arm64 \
        libbz2-1.0:arm64 liblzma5:arm64 libstdc++6:arm64 libgcc-s1:arm64 libsqlite3-0:arm64 libuuid1:arm64 \
        libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libgomp1:arm64 >/dev/null)
    for deb in "$ARM"/debs/*.deb; do dpkg -x "$deb" "$ARM/root"; done
    rm -rf "$ARM/debs"
fi

if [ ! -f "$ARM/site/.complete" ]; then
    # the host's versions, so both sides run the same code
    .venv/bin/python -m pip freeze | grep -iE '^(numpy|onnxruntime|onnx|tokenizers|protobuf|ml.dtypes|typing.extensions|flatbuffers|packaging|sympy|mpmath|pytest|pluggy|iniconfig|pygments)==' \
        > "$ARM/requirements.txt"
    rm -rf "$ARM/site"
    .venv/bin/python -m pip install -q --no-deps --target "$ARM/site" --only-binary=:all: --implementation cp \
        --python-version 3.11 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
        --platform manylinux2014_aarch64 -r "$ARM/requirements.txt"
    touch "$ARM/site/.complete"
fi

if [ ! -x "$ARM/zig/bin/python" ]; then
    .venv/bin/python -m venv "$ARM/zig"
    "$ARM/zig/bin/python" -m pip install -q ziglang==0.17.1
fi

cat > "$ARM/bin/python3" <<EOF
#!/bin/sh
# root's aarch64 Python under qemu; sys.executable is this script, so subprocesses run emulated too
export PYTHONHOME="$ARM/root/usr"
exec "$ARM/qemu/qemu-aarch64" -L "$ARM/root" -0 "$ARM/bin/python3" "$ARM/root/usr/bin/python3.11" "\$@"
EOF
chmod +x "$ARM/bin/python3"

echo "arm64 emulation ready in $ARM"
