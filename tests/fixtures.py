"""The one place tests get models from: tiny GPT-2 / GPT-Neo checkpoints built locally, no network.

Every architecture edgelm supports must have an entry in TINY_CONFIGS (a test enforces it).
Head size is 16 (ONNX Runtime's fused attention needs a multiple of 8); the GPT-Neo window is
4 so that every test sequence runs past it. The vocabulary is GPT-2's real 50257 tokens so the
real tokenizer (shipped in edgelm/assets/tokenizer) works with these models.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgelm.export.embedded import TOKENIZER_DIR

TINY_CONFIGS = {
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=2, n_head=2, n_embd=32,
                 n_positions=128, vocab_size=50257, bos_token_id=50256, eos_token_id=50256,
                 activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neo": dict(model_type="gpt_neo", architectures=["GPTNeoForCausalLM"], num_layers=2, num_heads=2,
                    hidden_size=32, max_position_embeddings=128, vocab_size=50257, window_size=4,
                    attention_types=[[["global", "local"], 1]], attention_layers=["global", "local"],
                    bos_token_id=50256, eos_token_id=50256, activation_function="gelu_new",
                    resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0),
}


def make_tiny_model(arch: str, folder: Path, seed: int = 0, scale: float = 1.0, **overrides) -> Path:
    """Save a randomly initialised tiny model (HF folder with safetensors and tokenizer) to ``folder``.

    ``scale`` multiplies every weight after initialisation, to make logits large enough that
    numerical differences show.
    """
    import torch
    import transformers

    config_dict = {**TINY_CONFIGS[arch], **overrides}
    config = transformers.AutoConfig.for_model(**config_dict)
    torch.manual_seed(seed)
    model = getattr(transformers, config_dict["architectures"][0])(config).eval()
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copyfile(f, folder / f.name)
    return folder


def make_pruned_tiny_model(arch: str, folder: Path, layer_heads, layer_inner, seed: int = 0, **overrides) -> Path:
    """A tiny model of TINY_CONFIGS (with ``overrides``) as structured pruning saves one.

    Layer i keeps ``layer_heads[i]`` attention heads (head size unchanged) and an MLP
    ``layer_inner[i]`` wide; config.json lists both (edgelm_layer_heads, edgelm_layer_inner)
    and the weights have the smaller shapes. The resized projections are randomly initialised.
    """
    import torch
    import transformers

    from edgelm.export.arch import LAYER_HEADS, LAYER_INNER
    from edgelm.export.torch_model import apply_layer_shapes

    config_dict = {**TINY_CONFIGS[arch], **overrides}
    config = transformers.AutoConfig.for_model(**config_dict)
    torch.manual_seed(seed)
    model = getattr(transformers, config_dict["architectures"][0])(config).eval()
    apply_layer_shapes(model, layer_heads, layer_inner)
    setattr(model.config, LAYER_HEADS, [int(n) for n in layer_heads])
    setattr(model.config, LAYER_INNER, [int(m) for m in layer_inner])
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copyfile(f, folder / f.name)
    return folder


def make_outlier_model(folder: Path, channels: tuple[int, ...] = (3, 11, 20), factor: float = 60.0,
                       seed: int = 0) -> Path:
    """A tiny GPT-2 whose LayerNorm outputs have a few huge channels, as real GPT-2's do.

    Function-preserving: in every layer, gamma and beta of ln_1 and ln_2 are multiplied by ``factor``
    on ``channels`` and the matching input rows of the next projection (c_attn, c_fc; Conv1D weights
    are [in, out]) are divided by it. The fp32 model computes the same logits; per-tensor int8
    activations lose the other channels. (For the SmoothQuant and GPTQ tests.)
    """
    import torch
    import transformers

    folder = make_tiny_model("gpt2", Path(folder), seed=seed)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    idx = list(channels)
    with torch.no_grad():
        for block in model.transformer.h:
            for norm, proj in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
                norm.weight[idx] *= factor
                norm.bias[idx] *= factor
                proj.weight[idx, :] /= factor
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_planted_model(arch: str, folder: Path, weak_heads: dict[int, list[int]], weak_neurons: dict[int, list[int]],
                       factor: float = 0.01, seed: int = 0, **overrides) -> Path:
    """A tiny model whose listed heads and MLP neurons barely matter: their rows of the output projections
    (attention out, MLP proj) are multiplied by ``factor``. Importance scoring must find them."""
    import torch
    import transformers

    from edgelm.export.arch import arch_for

    folder = make_tiny_model(arch, Path(folder), seed=seed, **overrides)
    config = {**TINY_CONFIGS[arch], **overrides}
    spec = arch_for(config)
    model = getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()
    head_size = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for lw, weak, width in ((spec.attn_out, weak_heads, head_size), (spec.proj, weak_neurons, 1)):
            for layer, units in weak.items():
                weight = model.get_parameter("transformer." + lw.names[0].format(i=layer))
                rows = torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])
                # the input axis: rows of GPT-2's Conv1D [in, out], columns of nn.Linear [out, in]
                if lw.transpose:
                    weight[:, rows] *= factor
                else:
                    weight[rows] *= factor
    model.save_pretrained(folder, safe_serialization=True)
    return folder
