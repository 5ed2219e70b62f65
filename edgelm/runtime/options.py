"""The runtime's choices, in one place for the runtime and the command lines that offer them."""

# provider name on the command line -> ONNX Runtime's execution provider
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Where a packed artifact's weights live while it runs (other layouts: ONNX Runtime copies them into
# its own prepacked buffers whichever is chosen):
# - mapped: ONNX Runtime maps the data file; the load reads nothing (gpt2-xl opens in 0.2 s) and
#   processes share the page cache
# - memory: the file's bytes handed to ONNX Runtime, which copies them into its own memory at load
#   (GPT-2 124M: 1.3 s instead of 0.3 s, 1.21 GB peak RSS; benchmarks/load_memory.py); for
#   long-running processes: decode 0.996x-1.045x the mapping per round here
#   (benchmarks/weight_memory_ab.py, results/weight_memory_ab-gpt2.json)
WEIGHT_PLACEMENTS = ("mapped", "memory")
# Which kernels run an fp32 artifact's projections and attention on the CPU:
# - edgelm: edgelm's operators (PackedLinear, CachedAttention, PackedEmbedding); a conv- or
#   matmul-layout artifact is turned into the packed graph while it loads
#   (optimize.onnx_edit.matmul_to_packed: node for node the packed export), its packed weights
#   held in this process's memory
# - onnxruntime: the graph as exported, on ONNX Runtime's own kernels
# - auto (default): edgelm where the artifact and this install allow it (artifact.edgelm_refusal),
#   else onnxruntime
KERNELS = ("auto", "edgelm", "onnxruntime")
# When the prompt plus the new tokens exceed the model's context: fail, or drop the prompt's start
CONTEXT_POLICIES = ("error", "truncate")


def max_threads() -> int:
    """The most intra-op threads a command takes: 4 per core (at least 16). Tens of thousands of
    threads hang the process while ONNX Runtime starts them."""
    import os

    return max(16, 4 * (os.cpu_count() or 1))


def check_threads(threads: int | None) -> None:
    """None or 0 (ONNX Runtime's own choice), else 1 to max_threads()."""
    from ..errors import InputError

    if threads and not 1 <= threads <= max_threads():
        raise InputError(f"threads must be from 1 to {max_threads()} (4 per core), got {threads}")
