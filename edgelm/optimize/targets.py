"""The machines a quantized artifact can be made for, as data: which modes have fast kernels there and
which operator formats and integer types each mode uses on it.

    avx2         x86-64 without VNNI (this project's CI machines)
    avx512-vnni  x86-64 with AVX512-VNNI (Cascade Lake and later Xeons, Zen 4)
    arm64        64-bit ARM CPUs (Graviton, Apple silicon, phones)
    cuda         NVIDIA GPUs through ONNX Runtime's CUDA provider

``auto`` means this machine's CPU. CUDA is never picked by ``auto``: ask for it by name.
Facts behind the choices: docs/FIELD_NOTES (dynamic QOperator int8 was the fastest int8 path on AVX2;
MatMulNBits needs ``accuracy_level=4`` on x86 to be fast) and ONNX Runtime's quantization guide
(7-bit weights, ``reduce_range``, avoid u8*s8 saturation on x86 without VNNI; ARM and TensorRT
prefer symmetric int8 activations).
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    provider: str  # the ONNX Runtime provider the artifact runs on there: "cpu" | "cuda"
    modes: tuple[str, ...]  # modes with kernels worth using on this target
    auto_candidates: tuple[str, ...]  # what --mode auto tries, in this order
    dynamic_reduce_range: bool  # int8-dynamic: 7-bit weights against u8*s8 saturation
    static_activations: str  # int8-static activations: "uint8" (asymmetric) or "int8" (symmetric)
    static_reduce_range: bool
    nbits_accuracy_level: int  # MatMulNBits accuracy_level (0 = leave it to the kernel)
    why: str  # why these choices, for the manifest

    def to_dict(self) -> dict:
        return asdict(self)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("avx2", "x86-64 CPU with AVX2, without VNNI", "cpu",
           ("int8-dynamic", "int8-static", "int8-weight", "int4-weight"),
           ("int8-dynamic", "int8-weight", "int4-weight"),
           dynamic_reduce_range=True, static_activations="uint8", static_reduce_range=True,
           nbits_accuracy_level=4,
           why="dynamic QOperator int8 (MatMulInteger, fused to DynamicQuantizeMatMul) was the fastest int8 "
               "path measured on AVX2; MatMulNBits with accuracy_level 4 (int8 activations) is 10x faster "
               "than the default level on x86; both int8 modes use 7-bit weights against u8*s8 saturation "
               "(AVX2's VPMADDUBSW saturates pairs of products at 16 bits)"),
    Target("avx512-vnni", "x86-64 CPU with AVX512-VNNI", "cpu",
           ("int8-dynamic", "int8-static", "int8-weight", "int4-weight"),
           ("int8-dynamic", "int8-weight", "int4-weight"),
           dynamic_reduce_range=False, static_activations="uint8", static_reduce_range=False,
           nbits_accuracy_level=4,
           why="VNNI accumulates u8*s8 products without saturation: full 8-bit weights in every int8 mode"),
    Target("arm64", "64-bit ARM CPU", "cpu",
           ("int8-dynamic", "int8-static", "int8-weight", "int4-weight"),
           ("int4-weight", "int8-weight", "int8-dynamic"),
           dynamic_reduce_range=False, static_activations="int8", static_reduce_range=False,
           nbits_accuracy_level=4,
           why="MatMulNBits has int8 dot-product kernels on ARM (accuracy_level 4); static activations "
               "symmetric int8, as ARM kernels prefer"),
    Target("cuda", "NVIDIA GPU (ONNX Runtime CUDA provider)", "cuda",
           ("int8-static", "int8-weight", "int4-weight"),
           ("int4-weight", "int8-weight"),
           dynamic_reduce_range=False, static_activations="int8", static_reduce_range=False,
           nbits_accuracy_level=0,
           why="weight-only MatMulNBits has CUDA kernels; static int8 in QDQ form with symmetric int8 "
               "activations (the form TensorRT takes); DynamicQuantizeLinear has no CUDA kernel, so "
               "int8-dynamic is not offered"),
)}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def this_machine() -> str | None:
    """The target name of this machine's CPU, or None when it is none of them."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if machine in ("x86_64", "amd64"):
        flags = _cpu_flags()
        if "avx512_vnni" in flags or "avx512vnni" in flags:
            return "avx512-vnni"
        if "avx2" in flags:
            return "avx2"
    return None


def cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def resolve_target(name: str) -> tuple[Target, bool]:
    """-> (target, whether it is this machine, so that its speed can be measured here)."""
    here = this_machine()
    if name == "auto":
        if here is None:
            raise InputError(f"this machine's CPU ({platform.machine()}) is none of the known targets; "
                             f"pass --target ({', '.join(TARGETS)})")
        return TARGETS[here], True
    if name not in TARGETS:
        raise InputError(f"target '{name}' is unknown; choose auto or one of {', '.join(TARGETS)}")
    is_here = cuda_available() if name == "cuda" else name == here
    return TARGETS[name], is_here
