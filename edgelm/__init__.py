"""edgelm: GPT-2 and GPT-Neo from PyTorch to fast, small, validated ONNX deployments.

Importing edgelm is cheap: subpackages load their heavy dependencies (torch, transformers,
onnxruntime) only inside the functions that need them.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
