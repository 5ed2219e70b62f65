"""Decode speed of the two linear layouts of one model, in many short interleaved rounds.

    .venv/bin/python benchmarks/layout_ab.py --model gpt2 --rounds 60

The same random-weight model exported twice (`edgelm export --linear-layout conv` and `matmul`),
both loaded in one process; each round generates 32 greedy tokens with each, in shuffled order.
Speeds on this shared machine drift by +-20% within minutes, so the figure is the median of the
per-round ratios (with quartiles). Writes benchmarks/results/layout_ab-MODEL.json.
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
from configs import MODELS  # noqa: E402
from random_checkpoint import ensure_model_folder  # noqa: E402
from runtime_bench import cached_artifact  # noqa: E402

CACHE = HERE / ".cache"
LAYOUTS = ("matmul", "conv")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--new-tokens", type=int, default=33, help="per generation (the first is the prompt step)")
    args = p.parse_args(argv)

    from edgelm.runtime import Generator, SamplingConfig

    model_dir = CACHE / args.model
    ensure_model_folder(MODELS[args.model][1], model_dir)
    gens = {layout: Generator.load(cached_artifact(model_dir, args.model, layout)) for layout in LAYOUTS}
    prompt = np.random.default_rng(0).integers(0, 50000, 32).tolist()
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    for g in gens.values():
        g.generate(prompt, SamplingConfig(max_new_tokens=4, stop_at_eos=False))
    rng = np.random.default_rng(1)
    rates = {k: [] for k in LAYOUTS}
    started = time.time()
    for r in range(args.rounds):
        for i in rng.permutation(len(LAYOUTS)):
            layout = LAYOUTS[i]
            rates[layout].append(gens[layout].generate(prompt, cfg).timings["decode_tokens_per_s"])
    ratio = np.array(rates["conv"]) / np.array(rates["matmul"])
    result = {
        "model": args.model, "rounds": args.rounds, "new_tokens": args.new_tokens, "seconds": round(time.time() - started),
        "command": " ".join(["python", *sys.argv]), "machine": machine(), "versions": versions(), "commit": commit(),
        "decode_tokens_per_s": rates,
        "median_tokens_per_s": {k: float(np.median(v)) for k, v in rates.items()},
        "conv_over_matmul": {"median": float(np.median(ratio)), "q25": float(np.quantile(ratio, 0.25)),
                             "q75": float(np.quantile(ratio, 0.75)), "rounds_conv_faster": int((ratio > 1).sum())},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"layout_ab-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    c = result["conv_over_matmul"]
    print(f"{args.model}: conv {result['median_tokens_per_s']['conv']:.1f} tok/s, matmul "
          f"{result['median_tokens_per_s']['matmul']:.1f} tok/s (medians); conv/matmul per round: median "
          f"{c['median']:.3f}, quartiles {c['q25']:.3f}-{c['q75']:.3f}, conv faster in {c['rounds_conv_faster']} of "
          f"{args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
