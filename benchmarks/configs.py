"""The real Hugging Face Hub configurations of the benchmarked models, as data.

The values are those of the hub's config.json files (openai-community/gpt2, openai-community/gpt2-xl,
EleutherAI/gpt-neo-125M, -1.3B, -2.7B). Only the weights are synthetic: no pretrained weights can be
downloaded on the benchmark machines, and shape, speed and memory do not depend on the values.
``tie_word_embeddings`` is written explicitly (it is the transformers default for both classes).
"""

from __future__ import annotations

_GPT2_COMMON = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "tie_word_embeddings": True,
    "vocab_size": 50257,
}

_NEO_COMMON = {
    "activation_function": "gelu_new",
    "architectures": ["GPTNeoForCausalLM"],
    "attention_dropout": 0,
    "bos_token_id": 50256,
    "embed_dropout": 0,
    "eos_token_id": 50256,
    "gradient_checkpointing": False,
    "initializer_range": 0.02,
    "intermediate_size": None,
    "layer_norm_epsilon": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neo",
    "resid_dropout": 0,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "tie_word_embeddings": True,
    "tokenizer_class": "GPT2Tokenizer",
    "use_cache": True,
    "vocab_size": 50257,
    "window_size": 256,
}


def _neo(layers: int, heads: int, hidden: int) -> dict:
    types = [[["global", "local"], layers // 2]]
    return {**_NEO_COMMON, "num_layers": layers, "num_heads": heads, "hidden_size": hidden,
            "attention_types": types,
            "attention_layers": [kind for kinds, repeat in types for _ in range(repeat) for kind in kinds]}


# name -> (hub id it mirrors, config.json contents); ordered smallest first
MODELS: dict[str, tuple[str, dict]] = {
    "gpt2": ("openai-community/gpt2", {**_GPT2_COMMON, "n_layer": 12, "n_head": 12, "n_embd": 768}),
    "gpt-neo-125M": ("EleutherAI/gpt-neo-125M", _neo(12, 12, 768)),
    "gpt-neo-1.3B": ("EleutherAI/gpt-neo-1.3B", _neo(24, 16, 2048)),
    "gpt2-xl": ("openai-community/gpt2-xl", {**_GPT2_COMMON, "n_layer": 48, "n_head": 25, "n_embd": 1600}),
    "gpt-neo-2.7B": ("EleutherAI/gpt-neo-2.7B", _neo(32, 20, 2560)),
}
