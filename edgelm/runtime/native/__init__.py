"""edgelm's compiled ONNX Runtime operator library (ai.edgelm.PackedLinear) and its kernels.

The library is built by ``pip install`` from ops.c and kernels.c beside this file (optional: an
install without a C compiler has none, and only the packed linear layout needs it). ONNX Runtime
loads it per session (``register``); ctypes reaches the same kernels without ONNX Runtime
(``kernels``), for tests and for the memory-read probe of edgelm.bench.machine.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from functools import lru_cache
from pathlib import Path

from ...errors import DependencyError

DOMAIN = "ai.edgelm"
SCREEN_INPUT = "edgelm_screen"  # the graph input the runtime adds for its LM head's screen (screen.c)
PANEL = 16  # output columns per panel of a packed weight (kernels.h)
HERE = Path(__file__).resolve().parent


def library_path() -> Path | None:
    """The built library, or None when this install has none."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"_edgelm_ops{suffix}"
        if path.is_file():
            return path
    return None


def require() -> Path:
    path = library_path()
    if path is None:
        raise DependencyError(
            "edgelm's operator library is not built (the packed linear layout needs it): reinstall edgelm "
            "where a C compiler is available (pip install -e . builds it), or export with --linear-layout conv"
        )
    return path


def register(options) -> None:
    """Make ONNX Runtime session options know ai.edgelm.PackedLinear."""
    options.register_custom_ops_library(str(require()))


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL:
    """The kernels through ctypes: edgelm_linear, edgelm_gelu_tanh, edgelm_read_sum, edgelm_read_chunks, edgelm_kernel_isa."""
    lib = ctypes.CDLL(str(require()))
    p, size = ctypes.c_void_p, ctypes.c_size_t
    lib.edgelm_linear.argtypes = [p, size, size, p, p, p, size]
    lib.edgelm_linear.restype = None
    lib.edgelm_gelu_tanh.argtypes = [p, size]
    lib.edgelm_gelu_tanh.restype = None
    lib.edgelm_read_sum.argtypes = [p, size]
    lib.edgelm_read_sum.restype = ctypes.c_double
    lib.edgelm_read_chunks.argtypes = [p, size, size, size, size]
    lib.edgelm_read_chunks.restype = ctypes.c_double
    lib.edgelm_kernel_isa.restype = ctypes.c_char_p
    lib.edgelm_pack_panels.argtypes = [p, size, size, size, size, p, size, size]
    lib.edgelm_pack_panels.restype = None
    lib.edgelm_resident_rows.argtypes = [size, size, size]
    lib.edgelm_resident_rows.restype = size
    return lib


def kernel_isa() -> str | None:
    """The instruction set the kernels run with here ("avx512f", "avx2" or "generic"), None without the library."""
    return kernels().edgelm_kernel_isa().decode() if library_path() else None


def pack_panels(weight):
    """A [K, N] weight as PackedLinear's panels: (ceil(N / 16), K, 16), the last panel zero-padded.

    ``weight`` may be a view, such as the transpose of a 1x1 Conv's [N, K] weight: the library packs
    from its strides in one pass, on every core (numpy, without the library, copies it twice)."""
    import numpy as np

    k, n = weight.shape
    panels = -(-n // PANEL)
    if library_path() is None or weight.dtype != np.float32 or any(s <= 0 or s % 4 for s in weight.strides):
        padded = np.zeros((panels * PANEL, k), dtype=weight.dtype)
        padded[:n] = weight.T
        return np.ascontiguousarray(padded.reshape(panels, PANEL, k).transpose(0, 2, 1))
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((panels, k, PANEL), dtype=np.float32)
    if not out.size:
        return out
    sk, sj = (s // 4 for s in weight.strides)
    threads = min(os.cpu_count() or 1, panels)
    bounds = [panels * t // threads for t in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:  # ctypes lets go of the GIL for each call
        list(pool.map(lambda t: kernels().edgelm_pack_panels(weight.ctypes.data, k, n, sk, sj, out.ctypes.data,
                                                              bounds[t], bounds[t + 1]), range(threads)))
    return out


def unpack_panels(packed, n: int):
    """The [K, N] weight back from its panels (the inverse of pack_panels)."""
    panels, k, lanes = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, panels * lanes)[:, :n]
