"""Load the PyTorch reference model with one copy of the weights in memory.

The module tree is created with its parameters on the meta device (buffers such as GPT-Neo's
causal masks are real), resized to the per-layer shapes of a pruned checkpoint, then every
parameter is assigned from a tensor read by our own checkpoint reader. No memory map stays
open, so resident memory is the weights once.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .arch import LAYER_HEADS, LAYER_INNER, ModelFacts, arch_for, resolve
from .checkpoint import open_checkpoint, read_config


def apply_layer_shapes(model, layer_heads, layer_inner) -> None:
    """Resize each layer of a GPT-2 / GPT-Neo model to ``layer_heads[i]`` heads and an MLP ``layer_inner[i]`` wide.

    Hugging Face builds every layer at the config's uniform size; a structurally pruned checkpoint
    has fewer heads (same head size) and narrower MLPs per layer. Each projection whose shape
    differs is replaced by a fresh module of the right shape, on the old one's device and dtype:
    on the meta device inside ``init_empty_weights``, otherwise randomly initialised as Hugging
    Face initialises the model. Projections that already have the right shape are kept. The
    attention modules' head counts are set to match (GPT-2 splits q, k, v by ``split_size`` and
    views with -1 heads; GPT-Neo splits and merges heads with ``num_heads``).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    model_type = model.config.model_type
    blocks = model.transformer.h
    if len(layer_heads) != len(blocks) or len(layer_inner) != len(blocks):
        raise InputError(f"got {len(layer_heads)} head counts and {len(layer_inner)} MLP widths for a model "
                         f"of {len(blocks)} layers; give one of each per layer")

    def place(owner, name: str, make, shape: tuple[int, ...]) -> None:
        old = getattr(owner, name)
        if tuple(old.weight.shape) == shape:
            return
        new = make().to(device=old.weight.device, dtype=old.weight.dtype)
        if not new.weight.is_meta:
            with torch.no_grad():
                model._init_weights(new)
        setattr(owner, name, new)

    for block, n, m in zip(blocks, layer_heads, layer_inner):
        n, m = int(n), int(m)
        if model_type == "gpt2":
            attn, mlp = block.attn, block.mlp
            d, h = attn.embed_dim, attn.head_dim
            place(attn, "c_attn", lambda: Conv1D(3 * n * h, d), (d, 3 * n * h))  # Conv1D weight: [in, out]
            place(attn, "c_proj", lambda: Conv1D(d, n * h), (n * h, d))
            attn.num_heads, attn.split_size = n, n * h
            place(mlp, "c_fc", lambda: Conv1D(m, d), (d, m))
            place(mlp, "c_proj", lambda: Conv1D(d, m), (m, d))
        elif model_type == "gpt_neo":
            attn, mlp = block.attn.attention, block.mlp
            d, h = attn.embed_dim, attn.head_dim
            for name in ("q_proj", "k_proj", "v_proj"):  # nn.Linear weight: [out, in]
                place(attn, name, lambda: torch.nn.Linear(d, n * h, bias=False), (n * h, d))
            place(attn, "out_proj", lambda: torch.nn.Linear(n * h, d), (d, n * h))
            attn.num_heads = n
            place(mlp, "c_fc", lambda: torch.nn.Linear(d, m), (m, d))
            place(mlp, "c_proj", lambda: torch.nn.Linear(m, d), (d, m))
        else:
            raise InputError(f"per-layer shapes are not supported for model_type '{model_type}'; "
                             "use a GPT-2 or GPT-Neo model")


def load_torch_model(model_dir: Path, facts: ModelFacts | None = None, dtype: str = "fp32"):
    import torch
    import transformers
    from transformers.integrations.accelerate import init_empty_weights

    config_dict = read_config(model_dir)
    spec = arch_for(config_dict)
    facts = facts or resolve(config_dict)
    config = transformers.AutoConfig.for_model(**config_dict)
    config._attn_implementation = "eager"  # the reference: exact softmax, GPT-Neo's fp32 upcast
    cls = getattr(transformers, spec.hf_class)
    with init_empty_weights():
        model = cls(config)
        apply_layer_shapes(model, facts.layer_heads, facts.layer_inner)
    ckpt = open_checkpoint(model_dir)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    state = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        source = name[len("transformer."):] if name.startswith("transformer.") else name
        if source == "lm_head.weight" and source not in ckpt:
            continue  # tied to wte
        if ckpt.shape(source) != tuple(param.shape):
            raise InputError(
                f"weight '{source}' in {model_dir} has shape {list(ckpt.shape(source))} where config.json implies "
                f"{list(param.shape)}; a pruned model's config.json needs {LAYER_HEADS} and {LAYER_INNER} that "
                "match its weights"
            )
        state[name] = torch.from_numpy(ckpt.read(source)).to(torch_dtype)
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"weights not found in the checkpoint: {still_meta[:5]} (missing: {missing[:5]})")
    return model.eval()
