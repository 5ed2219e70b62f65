"""Write Hugging Face model folders with random weights, streaming the safetensors file tensor by tensor.

The whole header (every name, shape and offset) is computed first and written, then each tensor is
generated in chunks and appended, so writing a 10 GB checkpoint holds a few tens of MB at a time.
Weights: normal(0, 0.02); LayerNorm weights 1; biases 0 (tied LM head: not stored, as transformers
saves it). Names and shapes are those of transformers' GPT2LMHeadModel and GPTNeoForCausalLM;
``check_against_transformers`` verifies that on tiny configurations.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "edgelm" / "assets" / "tokenizer"
STD = 0.02
CHUNK_ELEMENTS = 8 << 20  # 32 MB of float32 per generated chunk


def expected_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """[(name, shape, init)] in model order; init is 'normal', 'ones' or 'zeros'."""
    out: list[tuple[str, tuple[int, ...], str]] = []

    def add(name, shape, init="normal"):
        out.append((name, tuple(int(s) for s in shape), init))

    def norm(prefix, d):
        add(prefix + ".weight", (d,), "ones")
        add(prefix + ".bias", (d,), "zeros")

    vocab = cfg["vocab_size"]
    if cfg["model_type"] == "gpt2":
        d, layers, positions = cfg["n_embd"], cfg["n_layer"], cfg["n_positions"]
        inner = cfg.get("n_inner") or 4 * d
        add("transformer.wte.weight", (vocab, d))
        add("transformer.wpe.weight", (positions, d))
        for i in range(layers):
            p = f"transformer.h.{i}."
            norm(p + "ln_1", d)
            add(p + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: [in, out]
            add(p + "attn.c_attn.bias", (3 * d,), "zeros")
            add(p + "attn.c_proj.weight", (d, d))
            add(p + "attn.c_proj.bias", (d,), "zeros")
            norm(p + "ln_2", d)
            add(p + "mlp.c_fc.weight", (d, inner))
            add(p + "mlp.c_fc.bias", (inner,), "zeros")
            add(p + "mlp.c_proj.weight", (inner, d))
            add(p + "mlp.c_proj.bias", (d,), "zeros")
        norm("transformer.ln_f", d)
    elif cfg["model_type"] == "gpt_neo":
        d, layers, positions = cfg["hidden_size"], cfg["num_layers"], cfg["max_position_embeddings"]
        inner = cfg.get("intermediate_size") or 4 * d
        add("transformer.wte.weight", (vocab, d))
        add("transformer.wpe.weight", (positions, d))
        for i in range(layers):
            p = f"transformer.h.{i}."
            norm(p + "ln_1", d)
            for proj in ("k_proj", "v_proj", "q_proj"):  # nn.Linear: [out, in], no bias
                add(p + f"attn.attention.{proj}.weight", (d, d))
            add(p + "attn.attention.out_proj.weight", (d, d))
            add(p + "attn.attention.out_proj.bias", (d,), "zeros")
            norm(p + "ln_2", d)
            add(p + "mlp.c_fc.weight", (inner, d))
            add(p + "mlp.c_fc.bias", (inner,), "zeros")
            add(p + "mlp.c_proj.weight", (d, inner))
            add(p + "mlp.c_proj.bias", (d,), "zeros")
        norm("transformer.ln_f", d)
    else:
        raise ValueError(f"unsupported model_type {cfg['model_type']}")
    if not cfg.get("tie_word_embeddings", True):
        add("lm_head.weight", (vocab, cfg.get("n_embd") or cfg.get("hidden_size")))
    return out


def param_count(cfg: dict) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in expected_tensors(cfg))


def _header(cfg: dict) -> tuple[bytes, int]:
    """The safetensors header bytes (length prefix included) and the size of the data section."""
    header = {"__metadata__": {"format": "pt", "note": "edgelm benchmark: random weights, normal(0, 0.02)"}}
    offset = 0
    for name, shape, _ in expected_tensors(cfg):
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # data section 8-byte aligned, as the safetensors library does
    return struct.pack("<Q", len(raw)) + raw, offset


def _write_tensor(f, shape, init, rng) -> None:
    count = int(np.prod(shape, dtype=np.int64))
    if init in ("ones", "zeros"):
        f.write(np.full(count, 1.0 if init == "ones" else 0.0, dtype=np.float32).data)
        return
    done = 0
    while done < count:
        n = min(CHUNK_ELEMENTS, count - done)
        chunk = rng.standard_normal(n, dtype=np.float32)
        chunk *= STD
        f.write(chunk.data)
        done += n


def write_safetensors(cfg: dict, path: Path, seed: int = 0, progress=None) -> int:
    """Stream the checkpoint to ``path`` (via ``path.partial``); return its size in bytes."""
    head, data_bytes = _header(cfg)
    tensors = expected_tensors(cfg)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(head)
        items = progress(tensors, desc=f"writing {path.parent.name}", unit="tensor", leave=False) if progress else tensors
        for index, (_, shape, init) in enumerate(items):
            _write_tensor(f, shape, init, np.random.default_rng([seed, index]))
        size = f.tell()
    if size != len(head) + data_bytes:
        raise RuntimeError(f"{tmp}: wrote {size} bytes, expected {len(head) + data_bytes}")
    tmp.rename(path)
    return size


def folder_is_complete(cfg: dict, folder: Path) -> bool:
    st = folder / "model.safetensors"
    try:
        if json.loads((folder / "config.json").read_text()) != cfg:
            return False
        if any(not (folder / t.name).is_file() for t in TOKENIZER_DIR.iterdir()):
            return False
        head, data_bytes = _header(cfg)
        if st.stat().st_size != len(head) + data_bytes:
            return False
        with open(st, "rb") as f:
            return f.read(len(head)) == head
    except (OSError, ValueError):
        return False


def ensure_model_folder(cfg: dict, folder: Path, seed: int = 0, progress=None) -> bool:
    """Write the folder unless a complete one is there; return True when it was (re)written."""
    if folder_is_complete(cfg, folder):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for src in TOKENIZER_DIR.iterdir():
        shutil.copyfile(src, folder / src.name)
    write_safetensors(cfg, folder / "model.safetensors", seed, progress)
    if not folder_is_complete(cfg, folder):
        raise RuntimeError(f"{folder} is not complete after writing it")
    return True


# -- check against transformers ------------------------------------------------------------------
TINY = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": 96,
             "activation_function": "gelu_new", "tie_word_embeddings": True},
    "gpt_neo": {"model_type": "gpt_neo", "num_layers": 2, "num_heads": 2, "hidden_size": 16,
                "max_position_embeddings": 32, "vocab_size": 96, "window_size": 4,
                "attention_types": [[["global", "local"], 1]], "attention_layers": ["global", "local"],
                "activation_function": "gelu_new", "tie_word_embeddings": True},
}


def check_against_transformers(workdir: Path) -> list[str]:
    """Build each class on a tiny config: our names and shapes must be its state dict exactly, and a
    folder written by ``write_safetensors`` must load with no missing or unexpected keys."""
    import torch
    import transformers

    lines = []
    for model_type, cfg in TINY.items():
        cls = transformers.GPT2LMHeadModel if model_type == "gpt2" else transformers.GPTNeoForCausalLM
        model = cls(transformers.AutoConfig.for_model(**cfg))
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs.pop("lm_head.weight")  # tied to transformer.wte.weight; save_pretrained drops it
        ours = {name: shape for name, shape, _ in expected_tensors(cfg)}
        if ours != theirs:
            diff = sorted(set(ours.items()) ^ set(theirs.items()))[:6]
            raise AssertionError(f"{cls.__name__}: weight names/shapes differ from transformers: {diff}")
        folder = workdir / f"tiny-{model_type}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(cfg))
        write_safetensors(cfg, folder / "model.safetensors")
        loaded, info = cls.from_pretrained(folder, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            raise AssertionError(f"{cls.__name__}.from_pretrained on our file: {bad}")
        sd = loaded.state_dict()
        assert torch.equal(sd["transformer.ln_f.weight"], torch.ones(cfg.get("n_embd") or cfg["hidden_size"]))
        assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr(), "lm_head not tied"
        std = float(sd["transformer.wte.weight"].std())
        assert 0.015 < std < 0.025, std
        shutil.rmtree(folder)
        lines.append(f"{cls.__name__}: {len(ours)} tensors, names and shapes match transformers "
                     f"{transformers.__version__}; from_pretrained loads our file with no missing/unexpected keys")
    return lines
