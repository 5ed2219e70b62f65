"""Choosing the next token from logits, in NumPy, with Hugging Face's semantics.

Order (as in transformers' generate): repetition penalty, temperature, top-k, top-p, then
argmax (greedy) or a draw from the seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError, is_whole

_FLOAT32_SMALLEST = float(np.nextafter(np.float32(0), np.float32(1)))  # a temperature below is 0 in float32


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
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not 0 < self.temperature < math.inf:
            problems.append(f"temperature must be a finite number > 0 (got {self.temperature!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not 0 < self.repetition_penalty < math.inf:
            problems.append(f"repetition_penalty must be a finite number > 0 (got {self.repetition_penalty!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if self.seed is not None and not is_whole(self.seed, 0):
            problems.append(f"seed must be an integer >= 0 (got {self.seed!r})")
        if problems:
            raise InputError("; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


# a model's generation_config.json: the sampling settings it may set, and the SamplingConfig field each sets
MODEL_DEFAULT_KEYS = {"do_sample": "greedy", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                      "repetition_penalty": "repetition_penalty"}


def model_defaults(generation: dict, where: str) -> dict:
    """The sampling settings a model's generation_config.json (``generation``) sets, checked, in its own
    names ({"do_sample": True, "temperature": 0.7, ...}; the keys it has, null taken as absent). The
    export keeps them in the manifest and the runtime starts from them, as transformers' ``generate``
    does. ``where`` names their source in a refusal."""
    found = {k: generation[k] for k in MODEL_DEFAULT_KEYS if generation.get(k) is not None}
    for key, value in found.items():
        kind = bool if key == "do_sample" else int if key == "top_k" else (int, float)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            want = {bool: "true or false", int: "a whole number"}.get(kind, "a number")
            raise InputError(f"{where}'s {key} is {value!r}, not {want}; fix it")
    try:
        SamplingConfig(**sampling_settings(found))
    except InputError as exc:
        raise InputError(f"{where}'s sampling settings are out of range ({exc}); fix them") from None
    return found


def sampling_settings(defaults: dict) -> dict:
    """SamplingConfig's keyword arguments for a model's defaults (``model_defaults``' names)."""
    settings = {MODEL_DEFAULT_KEYS[k]: v for k, v in defaults.items()}
    if "greedy" in settings:
        settings["greedy"] = not settings["greedy"]
    return settings


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
    # the best logit becomes 0 before the division, so a tiny temperature sends the others to -inf
    # (the greedy limit) instead of every logit to inf and the probabilities to NaN
    logits -= logits.max(axis=-1, keepdims=True)
    logits /= max(cfg.temperature, _FLOAT32_SMALLEST)
    vocab = logits.shape[-1]
    rng = rng or np.random.default_rng()
    u = rng.random(logits.shape[0])
    tokens = np.empty(logits.shape[0], dtype=np.int64)
    for b, row in enumerate(logits):
        ids = None  # the tokens still drawable, ascending (None: every token)
        if 0 < cfg.top_k < vocab:  # the k most likely and every token tied with the k-th
            ids = np.flatnonzero(row >= np.partition(row, vocab - cfg.top_k)[vocab - cfg.top_k])
            row = row[ids]
        if cfg.top_p < 1.0:
            nucleus_only(row, cfg.top_p)  # in place: row is this step's copy or the top-k subset
            finite = np.flatnonzero(row > -np.inf)
            ids, row = (finite if ids is None else ids[finite]), row[finite]
        # the draw: the first token whose cumulative probability passes u (ids ascending, so the
        # same token a draw over the whole vocabulary with the others at probability 0 picks)
        cumulative = np.cumsum(_softmax(row))
        pick = min(int(np.count_nonzero(cumulative < u[b])), len(row) - 1)
        tokens[b] = pick if ids is None else ids[pick]
    return tokens


NUCLEUS_CANDIDATES = 256  # the fewest most likely tokens sorted when looking for the top-p set


def nucleus_only(logits: np.ndarray, top_p: float) -> None:
    """In place, one row (V,): -inf outside the smallest set of most likely tokens whose probabilities
    reach ``top_p`` (at least one token), tokens ordered by logit and then by index.

    Sorting the whole vocabulary every step (50257 logits) cost more than the rest of a step's
    sampling (benchmarks/sampling_speed.py). Instead one partition finds the logits of rank 256, 512,
    1024, ... and only the tokens down to the first of them whose tokens hold ``top_p`` of the
    probability are sorted (every token tied with that logit included).
    """
    vocab = logits.shape[0]
    live = int(np.count_nonzero(logits > -np.inf))  # top-k may have left only a few
    if live == 0:
        return
    probs = _softmax(logits)
    ranks = []
    while not ranks or ranks[-1] < live:
        ranks.append(min(NUCLEUS_CANDIDATES << len(ranks), live))
    ranked = np.partition(logits, [vocab - r for r in ranks])  # the rank-r logit at vocab - r
    for r in ranks:
        threshold = ranked[vocab - r]
        within = logits >= threshold
        if r < live and probs[within].sum() < top_p:
            continue
        candidates = np.flatnonzero(within)  # ascending ids: ties keep id order below
        order = candidates[np.argsort(-logits[candidates], kind="stable")]
        kept = probs[order]
        cumulative = np.cumsum(kept)
        if cumulative[-1] >= top_p or r == live:  # (the sum in sorted order decides)
            break
    keep = order[~(cumulative - kept >= top_p)]  # the prefix before the sum reaches top_p, and that token
    mask = np.ones(vocab, dtype=bool)
    mask[keep] = False
    logits[mask] = -np.inf


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)
