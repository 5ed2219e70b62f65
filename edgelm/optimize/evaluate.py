"""Perplexity on a text file, measured the same way for an ONNX artifact and for a PyTorch model.

Sliding window over the whole text: windows of at most ``max_length`` tokens advance by
``stride``; each window scores the ``stride`` tokens at its end, with the rest of the window as
context, so every token after the first is scored exactly once. Both sides see exactly
the same token windows, so the two numbers differ only by what the model computes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    max_length: int
    stride: int
    seconds: float
    source: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def exp_or_inf(nll: float) -> float:
    """The perplexity of a mean negative log-likelihood: inf past float range (a broken model), not an error."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def windows(n_tokens: int, max_length: int, stride: int):
    """[(begin, end, first_scored)]: tokens 1..n-1 scored exactly once, each with at least
    max_length - stride tokens of context (less only at the start of the text)."""
    out, first = [], 1
    while first < n_tokens:
        end = min(first + stride, n_tokens)
        out.append((max(0, end - max_length), end, first))
        first = end
    return out


def read_text(path: str | Path, option: str = "--text") -> str:
    """A UTF-8 text file's contents; ``option`` names where the path came from, for the error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no text file {path}; pass a UTF-8 text file with {option}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text to score
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; convert it first") from None
    if not text.strip():
        raise InputError(f"{path} is empty; pass a text with at least a few sentences")
    return text


def _check(n_tokens: int, max_length: int, stride: int, context: int) -> None:
    if not 2 <= max_length <= context:
        raise InputError(f"--max-length must be between 2 and the model's context of {context}, got {max_length}")
    if n_tokens < 2:
        raise InputError("the text has fewer than 2 tokens; perplexity needs more text")
    if not 1 <= stride < max_length:
        raise InputError(f"--stride must be at least 1 and less than the window ({max_length}), got {stride}")


def _log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (T, V), targets (T,) -> log p(target) (T,), float64 (exp in float32, sums in float64)."""
    x = np.array(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    picked = x[np.arange(len(targets)), targets].astype(np.float64) - m[:, 0]
    x -= m
    np.exp(x, out=x)
    return picked - np.log(x.sum(axis=-1, dtype=np.float64))


def prompt_feed(manifest: dict, chunk: np.ndarray, kv_dtype=np.float32, keep: int | None = None) -> dict:
    """Inputs for one forward pass over ``chunk`` (B, S) with empty caches, logits at the last ``keep``
    positions (all S by default; graphs without num_logits_to_keep give all S anyway)."""
    facts = manifest["model"]["facts"]
    names = {i["name"] for i in manifest["io"]["inputs"]}
    b, s = chunk.shape
    feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk),
            "position_ids": np.tile(np.arange(s, dtype=np.int64), (b, 1)),
            "num_logits_to_keep": np.array(s if keep is None else keep, np.int64)}
    feed = {k: v for k, v in feed.items() if k in names}
    for e in manifest["io"]["kv_cache"]:
        length = (e.get("window") or 0) if e["kind"] == "window" else 0
        # per-layer heads (pruned models); older manifests have one count for every layer
        heads, head_size = int(e.get("heads", facts["num_heads"])), int(e.get("head_size", facts["head_size"]))
        for name in (e["past_key"], e["past_value"]):
            feed[name] = np.zeros((b, heads, length, head_size), dtype=kv_dtype)
    return feed


def onnx_perplexity(artifact: str | Path, text: str, stride: int | None = None, max_length: int | None = None,
                    provider: str = "cpu", kernels: str = "auto") -> Perplexity:
    """Perplexity of an artifact with ONNX Runtime alone (no torch); ``kernels`` as the runtime takes them."""
    from ..runtime.artifact import load_artifact

    art = load_artifact(artifact, provider, kernels=kernels)
    ids = np.array(art.tokenizer.encode(text), dtype=np.int64)
    facts = art.facts
    max_length = min(int(facts["max_positions"]), 1024) if max_length is None else max_length
    stride = max_length // 2 if stride is None else stride
    _check(len(ids), max_length, stride, int(facts["max_positions"]))
    started = time.perf_counter()
    total, count, wins = 0.0, 0, windows(len(ids), max_length, stride)
    for begin, end, first in wins:
        keep = end - first + 1  # logits at t predict token t + 1: the scored tokens' are the last keep but one
        feed = prompt_feed(art.manifest, ids[begin:end][None], art.kv_dtype, keep)
        logits = art.session.run(["logits"], feed)[0][0][-keep:-1]  # (end - first, V)
        logp = _log_softmax_pick(logits, ids[first:end])
        total -= float(logp.sum())
        count += end - first
    nll = total / count
    return Perplexity(exp_or_inf(nll), nll, count, len(wins), max_length, stride,
                      round(time.perf_counter() - started, 3), f"onnx:{artifact}")


def torch_perplexity(model_dir: str | Path, text: str, stride: int | None = None,
                     max_length: int | None = None) -> Perplexity:
    """Perplexity of a Hugging Face model folder with PyTorch (same windows, same tokenizer)."""
    from ..export.arch import resolve
    from ..export.checkpoint import read_config, resolve_model_dir
    from ..export.torch_model import load_torch_model
    from .models import tokenizer_for

    model_dir = resolve_model_dir(str(model_dir))
    facts = resolve(read_config(model_dir))
    ids = np.array(tokenizer_for(model_dir).encode(text), dtype=np.int64)
    max_length = min(facts.max_positions, 1024) if max_length is None else max_length
    stride = max_length // 2 if stride is None else stride
    _check(len(ids), max_length, stride, facts.max_positions)
    model = load_torch_model(model_dir, facts)
    return model_perplexity(model, ids, max_length, stride, f"pytorch:{model_dir}")


LOGITS_BYTES = 64 << 20  # a PyTorch forward pass takes as many windows as keep its logits within this


def _same_length_runs(wins: list, most: int) -> list[list]:
    """Consecutive windows of one length, at most ``most`` at a time: one forward pass each, no padding."""
    runs: list[list] = []
    for w in wins:
        if runs and len(runs[-1]) < most and runs[-1][0][1] - runs[-1][0][0] == w[1] - w[0]:
            runs[-1].append(w)
        else:
            runs.append([w])
    return runs


def model_perplexity(model, ids: np.ndarray, max_length: int, stride: int, source: str = "pytorch") -> Perplexity:
    """Perplexity of a PyTorch model already in memory (the training steps score their students with it)."""
    import torch

    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", max_length)
    _check(len(ids), max_length, stride, int(context))
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    total, count, wins = 0.0, 0, windows(len(ids), max_length, stride)
    vocab = int(model.config.vocab_size)
    rows = max(1, LOGITS_BYTES // (stride * vocab * 4))  # windows per forward pass (a window scores <= stride tokens)
    with torch.inference_mode():
        for group in _same_length_runs(wins, rows):
            chunk = torch.from_numpy(np.stack([ids[begin:end] for begin, end, _ in group]))
            n, scored = chunk.shape[1], max(end - first for _, end, first in group)
            # the LM head (GPT-2's and GPT-Neo's lm_head) on the scored positions only: position t
            # predicts token t + 1, so the scored tokens' logits are rows [n - scored - 1, n - 1)
            hidden = model.transformer(input_ids=chunk)[0]
            logits = model.lm_head(hidden[:, n - scored - 1:n - 1]).float().numpy()
            for (begin, end, first), row in zip(group, logits):
                logp = _log_softmax_pick(row[scored - (end - first):], ids[first:end])
                total -= float(logp.sum())
                count += end - first
    model.train(was_training)
    nll = total / count
    return Perplexity(exp_or_inf(nll), nll, count, len(wins), max_length, stride,
                      round(time.perf_counter() - started, 3), source)


def perplexity(target: str, text: str, stride: int | None = None, max_length: int | None = None,
               provider: str = "cpu") -> Perplexity:
    """An artifact folder (has manifest.json) through ONNX Runtime; anything else through PyTorch."""
    from ..export.embedded import resolve_model_argument

    target = resolve_model_argument(target)
    if (Path(target) / "manifest.json").is_file():
        from ..manifest import read_manifest

        read_manifest(target, verify_checksums=True)  # a damaged copy of the weights would score, not fail
        return onnx_perplexity(target, text, stride, max_length, provider)
    if provider != "cpu":
        raise InputError(f"--provider {provider} applies to ONNX artifacts; a PyTorch model folder is scored "
                         "on the CPU, so leave --provider out or export the model first")
    return torch_perplexity(target, text, stride, max_length)
