"""Optimization steps on artifacts: perplexity evaluation and quantization (pruning, distillation: open issues).

Public API (loaded on first use, so importing this package costs nothing):

    quantize_artifact(source, out, QuantizeConfig(mode="int8-dynamic"), MeasureConfig(), ...) -> manifest
    QuantizeConfig, MeasureConfig, TARGETS (avx2, avx512-vnni, arm64, cuda), MODES
    perplexity(target, text, stride, max_length) -> Perplexity
"""

__all__ = ["MODES", "TARGETS", "MeasureConfig", "QuantizeConfig", "perplexity", "quantize_artifact"]

_WHERE = {"MODES": "modes", "TARGETS": "targets", "MeasureConfig": "measure", "QuantizeConfig": "quantize",
          "quantize_artifact": "quantize", "perplexity": "evaluate"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(name)
