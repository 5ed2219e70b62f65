"""Knowledge distillation, structured pruning and quantization (see the open issues)."""
