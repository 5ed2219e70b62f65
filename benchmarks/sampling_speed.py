"""Time per decode step of choosing the next token, per sampling setting, on GPT-2's vocabulary.

    .venv/bin/python benchmarks/sampling_speed.py [--batch 1] [--steps 300]

Times edgelm.runtime.sampling.next_tokens on logits of GPT-2's vocabulary (50257; a row of normal
values with standard deviation 3, a flat case for top-p: its 0.95 set holds thousands of tokens) for greedy,
temperature, top-k, top-p and top-k + top-p, and, as the baseline in the same run, the top-p that
sorted the whole vocabulary every step (what next_tokens did before nucleus_only). Each timing is
the median over --steps calls. Writes results/sampling_speed-bBATCH.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, machine, versions  # noqa: E402

VOCAB = 50257
SETTINGS = {
    "greedy": {},
    "temperature 0.8": dict(greedy=False, temperature=0.8),
    "top-k 50": dict(greedy=False, top_k=50),
    "top-p 0.95": dict(greedy=False, top_p=0.95),
    "top-k 50 + top-p 0.95": dict(greedy=False, top_k=50, top_p=0.95),
}


def full_sort_top_p(logits: np.ndarray, top_p: float, rng) -> np.ndarray:
    """The baseline: top-p by a stable sort of the whole vocabulary, then the same draw."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    e = np.exp(sorted_logits - sorted_logits[:, :1])
    probs = e / e.sum(axis=-1, keepdims=True)
    cumulative = np.cumsum(probs, axis=-1)
    sorted_logits[cumulative - probs >= top_p] = -np.inf
    np.put_along_axis(logits, order, sorted_logits, axis=-1)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    return (probs.cumsum(axis=-1) < rng.random((logits.shape[0], 1))).sum(axis=-1)


def _median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    from edgelm.runtime import SamplingConfig
    from edgelm.runtime.sampling import next_tokens, nucleus_only

    logits = np.random.default_rng(0).standard_normal((args.batch, VOCAB)).astype(np.float32) * 3
    rng = np.random.default_rng(1)
    ms = {name: _median_ms(lambda: next_tokens(logits, SamplingConfig(**cfg), rng), args.steps)
          for name, cfg in SETTINGS.items()}
    ms["top-p 0.95, whole-vocabulary sort (before)"] = _median_ms(
        lambda: full_sort_top_p(logits.copy(), 0.95, rng), args.steps)
    kept = []  # how flat these logits are: the tokens top-p 0.95 keeps, per row
    for row in logits.copy():
        nucleus_only(row, 0.95)
        kept.append(int(np.isfinite(row).sum()))
    result = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "versions": versions(),
              "commit": commit(), "batch": args.batch, "vocab": VOCAB, "top_p_0.95_tokens_kept": kept,
              "median_ms_per_step": ms}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sampling_speed-b{args.batch}.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, value in ms.items():
        print(f"{name:45s} {value:7.3f} ms per step (batch {args.batch})")
    print(f"top-p 0.95 keeps {', '.join(map(str, kept))} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
