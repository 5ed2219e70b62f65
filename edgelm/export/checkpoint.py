"""Find a model (local folder or hub id), read its config, and read its weights one tensor at a time.

Weights are read with plain file reads, never a memory map, so a tensor costs memory only while
it is in use: exporting a 10 GB checkpoint holds one tensor at a time, not the whole file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MODEL_SIDE_FILES = ("generation_config.json",)  # copied from the model folder whichever tokenizer it takes
GPT2_VOCAB = 50257
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "F64": np.float64}


def resolve_model_dir(model: str) -> Path:
    """A local folder as is, embedded:NAME as edgelm's embedded model; anything else is taken as a
    Hugging Face Hub id and downloaded."""
    from .embedded import resolve_model_argument

    model = resolve_model_argument(model)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{model} is a file; pass the folder that holds config.json and the weights")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InputError(f"no folder {model}; pass a Hugging Face model folder or a hub id such as 'gpt2'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(
            f"'{model}' is not a local folder, and downloading hub ids needs huggingface_hub: "
            "run pip install 'edgelm[export]', or pass a local model folder"
        ) from None
    try:
        return Path(
            snapshot_download(
                model,
                allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                                "pytorch_model.bin.index.json", *TOKENIZER_FILES, *MODEL_SIDE_FILES],
            )
        )
    except Exception as exc:  # offline, unknown id, gated repo: one sentence, no traceback
        kind = type(exc).__name__
        if "RepositoryNotFound" in kind or "RevisionNotFound" in kind:
            reason = "no such model on the Hub, or it is private"
        elif "GatedRepo" in kind:
            reason = "the model is gated: log in with huggingface-cli login"
        elif "LocalEntryNotFound" in kind or "Offline" in kind or "Connect" in kind or "Timeout" in kind:
            reason = "the Hub cannot be reached from here and the model is not in the local cache"
        else:
            text = str(exc).strip()
            reason = (text.splitlines()[0] if text else kind)[:160]
        raise InputError(
            f"could not download '{model}' from the Hugging Face Hub ({reason}); "
            "check the id and the network, or pass a local model folder such as embedded:gpt2"
        ) from None


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no config.json; pass a Hugging Face model folder")
    return read_json_object(path)


def read_generation_config(model_dir: Path) -> dict:
    """The folder's generation_config.json as a dict ({} when it has none)."""
    path = model_dir / "generation_config.json"
    return read_json_object(path) if path.is_file() else {}


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); restore the file from the model's source") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object; restore the file from the "
                         "model's source")
    return data


@dataclass
class _Entry:
    path: Path
    dtype: object
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Checkpoint:
    """Tensor names -> where to read them. ``read(name)`` returns a float32 numpy array."""

    model_dir: Path
    files: list[Path]
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _torch_state: dict | None = None
    prefix: str = ""

    def __contains__(self, name: str) -> bool:
        return (name if name.startswith("lm_head.") else self.prefix + name) in self._keys()

    def _keys(self):
        return self._entries.keys() if self._torch_state is None else self._torch_state.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        full = self._full(name)
        if self._torch_state is not None:
            return tuple(self._torch_state[full].shape)
        return self._entries[full].shape

    def _full(self, name: str) -> str:
        # lm_head.weight sits outside the "transformer." prefix in HF checkpoints
        full = name if name.startswith("lm_head.") else self.prefix + name
        if full not in self._keys():
            raise InputError(
                f"{self.model_dir} has no weight '{full}'; the checkpoint is incomplete or not of the architecture "
                "its config.json names"
            )
        return full

    def read(self, name: str) -> np.ndarray:
        full = self._full(name)
        if self._torch_state is not None:
            import torch

            return self._torch_state[full].to(torch.float32).numpy().copy()
        e = self._entries[full]
        count = int(np.prod(e.shape, dtype=np.int64))
        raw_dtype = np.uint16 if e.dtype == "bfloat16" else e.dtype
        out = np.empty(count, dtype=raw_dtype)
        with open(e.path, "rb") as f:
            f.seek(e.begin)
            got = f.readinto(memoryview(out).cast("B"))
        if got != e.end - e.begin or out.nbytes != e.end - e.begin:
            raise InputError(f"{e.path.name} is truncated or corrupt at tensor '{full}'; download it again")
        if e.dtype == "bfloat16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out.reshape(e.shape).astype(np.float32, copy=False)

    def nbytes_fp32(self) -> int:
        return sum(4 * int(np.prod(self.shape(k[len(self.prefix):]), dtype=np.int64))
                   for k in self._keys() if k.startswith(self.prefix))


def _read_safetensors_header(path: Path) -> dict[str, _Entry]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
        base = 8 + length
        size = path.stat().st_size
        entries = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _ST_DTYPES:  # a non-float buffer (older GPT-2 files' uint8 attn.bias
                continue  # masks): no weight; were a weight missing, reading it says so
            begin, end = meta["data_offsets"]
            if base + end > size:
                raise ValueError(f"tensor {name} ends past the end of the file")
            entries[name] = _Entry(path, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), base + begin, base + end)
        return entries
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc}); download it again") from None


def open_checkpoint(model_dir: Path, weight_prefix_candidates=("transformer.", "")) -> Checkpoint:
    """Index the weights of a model folder: safetensors (single or sharded) or pytorch_model.bin."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    entries: dict[str, _Entry] = {}
    files: list[Path] = []
    if single.is_file() or index.is_file():
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise InputError(f"{index} has no weight_map of tensor names to shard files; "
                                 "restore the file from the model's source")
            files = sorted({model_dir / f for f in weight_map.values()})
        else:
            files = [single]
        for f in files:
            if not f.is_file():
                raise InputError(f"{model_dir} lacks weight shard {f.name}; download the whole model folder")
            entries.update(_read_safetensors_header(f))
        ckpt = Checkpoint(model_dir, files, entries)
    else:
        bins = sorted(model_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise InputError(
                f"{model_dir} has no model.safetensors or pytorch_model.bin; pass a complete Hugging Face model folder"
            )
        import torch

        state = {}
        for f in bins:
            try:
                state.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
            except Exception as exc:
                raise InputError(f"{f} is not a readable PyTorch checkpoint ({str(exc)[:120]}); download it again") from None
        ckpt = Checkpoint(model_dir, bins, _torch_state=state)
    keys = list(ckpt._keys())
    for prefix in weight_prefix_candidates:
        if any(k.startswith(prefix + "h.0.") for k in keys):
            ckpt.prefix = prefix
            break
    else:
        raise InputError(f"{model_dir}: no weights named like 'transformer.h.0.*'; is this a GPT-2 or GPT-Neo checkpoint?")
    return ckpt


def checked_tokenizer(model_dir: Path, vocab_size: int):
    """(folder, runtime.artifact.Tokenizer): the tokenizer a model uses, read once. Its folder is the
    model's own (tokenizer.json, or vocab.json and merges.txt), or, for a folder with no tokenizer files and GPT-2's vocabulary of 50257 tokens (edgelm's
    embedded models, a checkpoint saved without its tokenizer), the GPT-2 tokenizer shipped with
    edgelm, which GPT-2 and GPT-Neo share. A partial tokenizer, or none with another vocabulary, is
    an InputError, as is one with more tokens than the model has embeddings.
    """
    from ..runtime.artifact import Tokenizer
    from .embedded import TOKENIZER_DIR

    own = [name for name in ("tokenizer.json", "vocab.json", "merges.txt") if (model_dir / name).is_file()]
    if "tokenizer.json" in own or {"vocab.json", "merges.txt"} <= set(own):
        folder = model_dir
    elif own:
        raise InputError(f"{model_dir} has {own[0]} but not a whole tokenizer (tokenizer.json, or vocab.json and "
                         "merges.txt); copy the missing tokenizer files into the model folder")
    elif vocab_size == GPT2_VOCAB:
        folder = TOKENIZER_DIR
    else:
        raise InputError(f"{model_dir} has no tokenizer files and its vocabulary of {vocab_size} tokens is not "
                         f"GPT-2's {GPT2_VOCAB}; copy its tokenizer (tokenizer.json, or vocab.json and merges.txt) "
                         "into the model folder")
    tokenizer = Tokenizer(folder, InputError)
    if (size := tokenizer.size) > vocab_size:
        raise InputError(f"the tokenizer in {folder} has {size} tokens but the model only {vocab_size} embeddings; "
                         "give the model folder the tokenizer it was trained with")
    return folder, tokenizer


def copy_tokenizer(model_dir: Path, out_dir: Path, vocab_size: int) -> dict:
    """Copy the model's tokenizer (``checked_tokenizer``) and generation config; return the manifest's
    record of them: {"files": [names], "source": where the tokenizer came from}."""
    import shutil

    folder = checked_tokenizer(model_dir, vocab_size)[0]
    copied = []
    for name, src in [(n, folder / n) for n in TOKENIZER_FILES] + [(n, model_dir / n) for n in MODEL_SIDE_FILES]:
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    source = "the model folder" if folder == model_dir else \
        f"edgelm's GPT-2 tokenizer (the model folder has none; the same {GPT2_VOCAB}-token vocabulary)"
    return {"files": copied, "source": source}


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise).

    Without the trim, the PyTorch reference's freed weights stay in this process's resident set
    while ONNX Runtime allocates its own, and the export's peak grows by the model's size.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def large_blocks_from_the_os(threshold: int = 1 << 20) -> None:
    """glibc: serve every allocation of ``threshold`` bytes or more with its own mapping, given back
    to the system when freed. By default glibc raises that threshold to 32 MiB as blocks are freed,
    and a validation's transient tensors (a layer's activations, a prompt's logits) then stay in its
    heaps: ONNX Runtime's prompt step over gpt-neo-1.3B left 1.3 GB of freed memory resident, and
    the export's peak at 1.34x the weights. For the rest of the process (glibc offers no way back
    to the adaptive threshold); elsewhere (macOS, musl) nothing changes."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass
