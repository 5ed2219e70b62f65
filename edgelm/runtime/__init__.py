"""A lean generation runtime over ONNX Runtime: no torch, no transformers.

Public API:
    Generator.load(folder, provider="cpu")  -> Generator
    Generator.generate(prompt | [prompts], SamplingConfig(...)) -> GenerationResult | list
    Generator.stream(prompt, SamplingConfig(...)) -> iterator of StreamEvent
"""

from .generator import GenerationResult, Generator, StreamEvent
from .sampling import SamplingConfig

__all__ = ["GenerationResult", "Generator", "SamplingConfig", "StreamEvent"]
