"""Choosing the next token from logits, in NumPy, with Hugging Face's semantics.

Order (as in transformers' generate): repetition penalty, temperature, top-k, top-p, then
argmax (greedy) or a draw from the seeded generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (got {self.temperature!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise InputError("; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """In place. logits (B, V); seen (B, V) bool: tokens in the prompt or generated so far."""
    if penalty == 1.0:
        return
    scaled = np.where(logits > 0, logits / penalty, logits * penalty)
    np.copyto(logits, scaled, where=seen)


def next_tokens(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator | None,
                seen: np.ndarray | None = None) -> np.ndarray:
    """logits (B, V) float32 -> token ids (B,) int64."""
    if cfg.greedy and seen is None:  # nothing to change in the logits: no copy
        return np.asarray(logits).argmax(axis=-1).astype(np.int64)
    logits = np.array(logits, dtype=np.float32, copy=True)
    if seen is not None:
        apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    logits /= cfg.temperature
    vocab = logits.shape[-1]
    if 0 < cfg.top_k < vocab:
        kth = np.partition(logits, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        logits[logits < kth] = -np.inf
    if cfg.top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = _softmax(sorted_logits)
        cumulative = np.cumsum(probs, axis=-1)
        remove = cumulative - probs >= cfg.top_p  # keep the smallest prefix reaching top_p (at least one)
        sorted_logits[remove] = -np.inf
        np.put_along_axis(logits, order, sorted_logits, axis=-1)
    probs = _softmax(logits)
    rng = rng or np.random.default_rng()
    u = rng.random((probs.shape[0], 1))
    return (probs.cumsum(axis=-1) < u).sum(axis=-1).clip(max=vocab - 1).astype(np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)
