"""Load the PyTorch reference model with one copy of the weights in memory.

The module tree is created with its parameters on the meta device (buffers such as GPT-Neo's
causal masks are real), then every parameter is assigned from a tensor read by our own
checkpoint reader. No memory map stays open, so resident memory is the weights once.
"""

from __future__ import annotations

from pathlib import Path

from .arch import ModelFacts, arch_for
from .checkpoint import open_checkpoint, read_config


def load_torch_model(model_dir: Path, facts: ModelFacts | None = None, dtype: str = "fp32"):
    import torch
    import transformers
    from transformers.integrations.accelerate import init_empty_weights

    config_dict = read_config(model_dir)
    spec = arch_for(config_dict)
    config = transformers.AutoConfig.for_model(**config_dict)
    config._attn_implementation = "eager"  # the reference: exact softmax, GPT-Neo's fp32 upcast
    cls = getattr(transformers, spec.hf_class)
    with init_empty_weights():
        model = cls(config)
    ckpt = open_checkpoint(model_dir)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    state = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        source = name[len("transformer."):] if name.startswith("transformer.") else name
        if source == "lm_head.weight" and source not in ckpt:
            continue  # tied to wte
        state[name] = torch.from_numpy(ckpt.read(source)).to(torch_dtype)
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"weights not found in the checkpoint: {still_meta[:5]} (missing: {missing[:5]})")
    return model.eval()
