"""Optimization steps: perplexity evaluation, quantization, distillation, structured pruning, recipes.

Public API (loaded on first use, so importing this package costs nothing):

    quantize_artifact(source, out, QuantizeConfig(mode="int8-dynamic"), MeasureConfig(), ...) -> manifest
    distill_model(teacher, out, train_text, TrainConfig(minutes=20), student_layers="6") -> step record
    prune_model(model, out, train_text, PruneConfig(heads=0.25, mlp=0.30), recover=TrainConfig(steps=300))
    run_recipe("recipe.toml", out) -> report
    QuantizeConfig, MeasureConfig, TrainConfig, PruneConfig, TARGETS (avx2, avx512-vnni, arm64, cuda), MODES
    perplexity(target, text, stride, max_length) -> Perplexity
"""

__all__ = ["MODES", "TARGETS", "MeasureConfig", "PruneConfig", "QuantizeConfig", "TrainConfig", "distill_model",
           "perplexity", "prune_model", "quantize_artifact", "run_recipe"]

_WHERE = {"MODES": "modes", "TARGETS": "targets", "MeasureConfig": "measure", "QuantizeConfig": "quantize",
          "quantize_artifact": "quantize", "perplexity": "evaluate", "TrainConfig": "train", "PruneConfig": "prune",
          "distill_model": "distill", "prune_model": "prune", "run_recipe": "recipe"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(name)
