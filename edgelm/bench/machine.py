"""The machine a benchmark ran on: its description, its memory-bandwidth ceiling, package versions.

Decoding one token reads every weight once (batch 1), so a memory-bound decoder cannot beat
bandwidth / weight bytes per token. Both numbers are measured or computed here, in the same run
as the benchmark, because absolute speeds drift on shared machines.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DTYPE_BYTES = {"fp32": 4, "fp16": 2}


def measure_bandwidth(gib: float = 1.0, passes: int = 8, threads: int | None = None) -> float:
    """Best read bandwidth in GB/s: ``threads`` threads reading one buffer together (read_kernels).

    The best pass of any reader: the ceiling should be the most the memory system gave, so that a
    fraction of it is not flattering.
    """
    threads = threads or os.cpu_count() or 1
    buf = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    best, readers = 0.0, read_kernels()
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            for reader in readers:
                best = max(best, buf.nbytes / timed_read(pool, threads, reader, buf) / 1e9)
    return best


READ_CHUNK = 1 << 17  # floats (512 KiB) per chunk of the interleaved reader


def read_kernels() -> list:
    """The probe's readers, fastest last: functions (pool, threads, buf) that read all of ``buf``.

    - a float32 sum and a 64-bit bitwise OR, each thread reducing slices of its own (4 per thread);
    - where edgelm's operator library is built, its vector sum (4 streams in lockstep, as the linear
      kernel reads 4 panels at once; one stream per thread read about a quarter less on an AVX2
      EPYC) over the same slices, and over interleaved 512 KiB chunks, thread t taking chunks t,
      t + threads, ...: the threads then read within a few chunks of one another, as the decode's
      do within a layer's projections (ONNX Runtime hands each thread a contiguous run of an
      operator's chunks, a few MB from the other's). On that EPYC it drew 1.03x the slices' rate
      (median of 40 per-round ratios; benchmarks/read_probe.py, results/read_probe.md), and more in
      earlier, less loaded minutes; the probe keeps the best of every reader. ctypes lets go of the
      GIL.
    """

    def slices(reduce):
        return lambda pool, threads, buf: list(pool.map(reduce, np.array_split(buf, threads * 4)))

    readers = [slices(np.sum),
               slices(lambda part: np.bitwise_or.reduce(part[: part.size // 2 * 2].view(np.uint64)))]
    from ..runtime import native

    if native.library_path():
        lib = native.kernels()
        readers.append(slices(lambda part: lib.edgelm_read_sum(part.ctypes.data, part.size)))
        readers.append(lambda pool, threads, buf: list(pool.map(
            lambda t: lib.edgelm_read_chunks(buf.ctypes.data, buf.size, READ_CHUNK, t, threads), range(threads))))
    return readers


def timed_read(pool: ThreadPoolExecutor, threads: int, reader, buf: np.ndarray) -> float:
    """Seconds for one read of ``buf`` by ``reader`` (from read_kernels) on the pool's ``threads`` threads."""
    t = time.perf_counter()
    reader(pool, threads, buf)  # numpy and ctypes let go of the GIL inside the reduction
    return time.perf_counter() - t


def parameter_count(facts: dict) -> int:
    """Parameters of a GPT-2 / GPT-Neo with tied embeddings, from the manifest's ModelFacts."""
    d, inner, layers = int(facts["hidden_size"]), int(facts["inner_size"]), int(facts["num_layers"])
    qkv_bias = 3 * d if facts["model_type"] == "gpt2" else 0  # GPT-Neo's q, k, v have no bias
    per_layer = (3 * d * d + qkv_bias) + (d * d + d) + (d * inner + inner) + (inner * d + d) + 4 * d  # + 2 LayerNorms
    return int(facts["vocab_size"]) * d + int(facts["max_positions"]) * d + layers * per_layer + 2 * d


def weight_bytes_per_token(facts: dict, dtype: str = "fp32", graph_weight_bytes: int | None = None) -> int:
    """Weight bytes one decode step reads: every weight once, except the position table (only gathered).

    The tied embedding counts once (the LM head reads all of it). ``graph_weight_bytes`` (the
    manifest's figure for an edgelm graph) is used when given, so quantized graphs count right.
    """
    bytes_per = DTYPE_BYTES.get(dtype, 4)
    positions = int(facts["max_positions"]) * int(facts["hidden_size"]) * bytes_per
    total = graph_weight_bytes if graph_weight_bytes else parameter_count(facts) * bytes_per
    return int(total - positions)


def machine_info() -> dict:
    try:
        import psutil

        cores, ram = psutil.cpu_count(logical=False), psutil.virtual_memory().total
    except ImportError:  # psutil comes with the [bench] extra; without it, what os knows
        cores, ram = None, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    info = {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
            "physical_cores": cores, "ram_bytes": ram, "python": platform.python_version(), "gpus": _gpus()}
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpus() -> list[str]:
    """NVIDIA GPUs seen through NVML (nvidia-ml-py comes with CodeCarbon); empty when none or unknown."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
                    for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU to report
        return []


PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers", "torch", "transformers", "optimum",
            "optimum-onnx", "ctranslate2", "codecarbon")


def versions() -> dict:
    import importlib.metadata as md

    from .. import __version__

    out = {"edgelm": __version__, "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
