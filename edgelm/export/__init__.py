"""Export GPT-2 and GPT-Neo checkpoints to one validated ONNX decoder graph with a KV cache.

The public API is loaded on first use, so importing this package costs nothing.
"""

__all__ = ["ARCHITECTURES", "ModelFacts", "export_model", "resolve"]


def __getattr__(name):
    if name in ("ARCHITECTURES", "ModelFacts", "resolve"):
        from . import arch

        return getattr(arch, name)
    if name == "export_model":
        from .pipeline import export_model

        return export_model
    raise AttributeError(name)
