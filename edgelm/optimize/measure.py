"""What a quantization step is judged by: perplexity on text, decode speed with edgelm's runtime, bytes.

Speeds of several artifacts are measured in one loop, round-robin (source, candidate, source, ...),
so that a busy shared machine slows all of them alike; the median of the repeats is kept.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from ..manifest import read_manifest


@dataclass(frozen=True)
class MeasureConfig:
    max_length: int | None = None  # perplexity window (default: the context, at most 1024)
    stride: int | None = None  # perplexity stride (default: half the window)
    prompt_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 3

    def __post_init__(self):
        from ..errors import InputError

        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.repeats < 1:
            raise InputError("speed measurement needs at least 1 prompt token, 2 new tokens and 1 repeat")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def model_bytes(folder: Path) -> int:
    """Bytes of the graph file and its external data (what a deployment loads)."""
    graph = read_manifest(folder)["graph"]
    files = [graph["file"]] + ([graph["external_data"]] if graph.get("external_data") else [])
    return sum((Path(folder) / f).stat().st_size for f in files)


def perplexity(folder: Path, text: str, cfg: MeasureConfig, provider: str = "cpu"):
    from .evaluate import onnx_perplexity

    return onnx_perplexity(folder, text, cfg.stride, cfg.max_length, provider)


def decode_speeds(folders: dict[str, Path], prompt: list[int], cfg: MeasureConfig, provider: str = "cpu",
                  progress: bool = False) -> dict[str, dict]:
    """{name: {tokens_per_s (median), runs, kernels}} for each artifact, greedy decoding of ``cfg.new_tokens``
    on the runtime's default kernels (an fp32 artifact on edgelm's, a quantized one on ONNX Runtime's)."""
    from tqdm import tqdm

    from ..runtime import Generator, SamplingConfig

    gens = {name: Generator.load(folder, provider) for name, folder in folders.items()}
    sampling = SamplingConfig(max_new_tokens=cfg.new_tokens, stop_at_eos=False)
    for gen in gens.values():  # warm-up: first runs allocate and prepack
        gen.generate(prompt, SamplingConfig(max_new_tokens=4, stop_at_eos=False))
    runs: dict[str, list[float]] = {name: [] for name in gens}
    for _ in tqdm(range(cfg.repeats), desc="measuring decode speed", unit="round", disable=not progress, leave=False):
        for name, gen in gens.items():
            runs[name].append(gen.generate(prompt, sampling).timings["decode_tokens_per_s"])
    kernels = {name: gen.art.kernels for name, gen in gens.items()}
    del gens
    return {name: {"tokens_per_s": round(statistics.median(r), 2), "runs": r, "kernels": kernels[name]}
            for name, r in runs.items()}
