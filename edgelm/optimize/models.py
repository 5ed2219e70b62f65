"""PyTorch models for the training steps (distill, prune): load, build from tensors, save, lineage.

A step's output is a Hugging Face model folder: config.json, model.safetensors (fp32), the
tokenizer files, and ``edgelm_steps.json``, the list of step records that made it (the lineage;
``edgelm export`` copies it into the artifact's manifest). Per-layer head counts and MLP widths
of pruned models live in config.json (``edgelm_layer_heads``, ``edgelm_layer_inner``), which
``load_torch_model``, the exporter and the runtime read.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..manifest import LINEAGE_FILE

def model_dir_of(model: str) -> Path:
    """A local folder, ``embedded:NAME`` or a hub id -> a local model folder."""
    from ..export.checkpoint import resolve_model_dir

    return resolve_model_dir(model)


def tokenizer_for(model_dir: Path):
    """The tokenizer a model folder uses, chosen as the exporter chooses it (checkpoint.checked_tokenizer)."""
    from ..export.checkpoint import checked_tokenizer, read_config

    return checked_tokenizer(model_dir, int(read_config(model_dir).get("vocab_size", 0)))[1]


def load_model(model_dir: Path):
    """(model in eval mode with trainable fp32 parameters, config dict)."""
    from ..export.checkpoint import read_config
    from ..export.torch_model import load_torch_model

    config = read_config(model_dir)
    model = load_torch_model(model_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, config


def build_model(config: dict, tensors: dict | None = None, seed: int = 0):
    """A model of ``config`` (per-layer shapes included); parameters from ``tensors`` {name: tensor},
    or freshly initialised by transformers when ``tensors`` is None."""
    import torch
    import transformers
    from transformers.integrations.accelerate import init_empty_weights

    from ..export.arch import arch_for, resolve
    from ..export.torch_model import apply_layer_shapes

    spec, facts = arch_for(config), resolve(config)
    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    cls = getattr(transformers, spec.hf_class)
    if tensors is None:
        torch.manual_seed(seed)
        model = cls(hf_config)
        apply_layer_shapes(model, list(facts.layer_heads), list(facts.layer_inner))
        model.tie_weights()
        return model.eval()
    with init_empty_weights():
        model = cls(hf_config)
        apply_layer_shapes(model, list(facts.layer_heads), list(facts.layer_inner))
    state = {n: t.detach().clone().float() for n, t in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"no tensors given for {meta[:5]}")
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def parameter_bytes(model) -> int:
    """fp32 bytes of the distinct parameters (a tied LM head counts once)."""
    return sum(4 * p.numel() for p in model.parameters())


def save_model(model, config: dict, folder: Path, source_dir: Path, steps: list[dict]) -> None:
    """Write a Hugging Face folder that PyTorch (``load_torch_model``), the exporter and the runtime read."""
    from safetensors.torch import save_file

    from ..export.checkpoint import copy_tokenizer

    folder = Path(folder)
    tensors = {name: p.detach().contiguous().cpu().float() for name, p in model.named_parameters()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(source_dir, folder, int(config["vocab_size"]))
    (folder / LINEAGE_FILE).write_text(json.dumps(steps, indent=2) + "\n")
