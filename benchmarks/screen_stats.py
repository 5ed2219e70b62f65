"""What the LM head's screen computes in fp32, and what building it costs the first screened call.

    .venv/bin/python benchmarks/screen_stats.py --model gpt2 --prompts 100

For one model (a random-weight shape of benchmarks/configs.py, or embedded:gpt2 / embedded:gpt-neo,
the trained small models) on edgelm's kernels:
- candidates: for each of --prompts prompts (random tokens for a random-weight model, windows of
  edgelm's held-out text of 8 to 64 tokens for a trained one), the prompt's forward pass with the screen
  off and on; the 16-column panels whose logits come out bit for bit equal are the ones the screen
  computed in fp32 (an estimate is never the fp32 value's exact bits in practice), and the argmax
  must agree;
- first call: a fresh generator's first screened generation (2 tokens; it builds the int8 copy) against
  its second, and a fresh generator's first and second generation with the screen off.
Writes benchmarks/results/screen_stats-MODEL.json.
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
from common import RESULTS, commit, machine, versions  # noqa: E402
from configs import MODELS  # noqa: E402

EMBEDDED = ("embedded:gpt2", "embedded:gpt-neo")


def artifact_for(model: str) -> Path:
    """The default export of ``model`` (cached under benchmarks/.cache/artifacts)."""
    from random_checkpoint import ensure_model_folder
    from runtime_bench import CACHE, cached_artifact

    if model in EMBEDDED:
        from edgelm.optimize.models import model_dir_of

        return cached_artifact(model_dir_of(model), model.replace(":", "-"), "conv")
    model_dir = CACHE / model
    ensure_model_folder(MODELS[model][1], model_dir)
    return cached_artifact(model_dir, model, "conv")


def prompts_for(model: str, count: int, tokenizer) -> list[list[int]]:
    rng = np.random.default_rng(0)
    if model not in EMBEDDED:
        return rng.integers(0, 50000, (count, 32)).tolist()
    ids = tokenizer.encode((Path(__file__).resolve().parent.parent / "edgelm/assets/text/heldout.txt").read_text())
    starts = rng.integers(0, len(ids) - 64, count)
    return [ids[s:s + int(rng.integers(8, 65))] for s in starts]


def candidates(art, prompts: list[list[int]]) -> dict:
    from edgelm.optimize.evaluate import prompt_feed
    from edgelm.runtime.native import PANEL, SCREEN_INPUT

    counts, agree = [], 0
    for p in prompts:
        feed = prompt_feed(art.manifest, np.array([p], np.int64), art.kv_dtype, 1)
        full, screened = (art.session.run(["logits"], {**feed, SCREEN_INPUT: np.array(on, np.int64)})[0][0, -1]
                          for on in (0, 1))
        vocab = full.shape[0]
        panels = -(-vocab // PANEL)
        padded = np.full((2, panels * PANEL), np.nan, np.float32)
        padded[0, :vocab], padded[1, :vocab] = full, screened
        same = (padded[0] == padded[1]).reshape(panels, PANEL).any(axis=1)
        counts.append(int(same.sum()))
        agree += int(full.argmax() == screened.argmax())
    return {"prompts": len(prompts), "panels": panels, "candidate_panels_median": float(np.median(counts)),
            "candidate_panels_max": int(max(counts)), "candidate_panels_all": counts, "argmax_agrees": agree}


def first_call(folder: Path) -> dict:
    from edgelm.runtime import Generator, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=2, stop_at_eos=False)
    out = {}
    for on in (False, True):
        gen = Generator.load(folder)
        gen.screen = on
        times = []
        for _ in range(2):
            started = time.perf_counter()
            gen.generate([1, 2, 3], cfg)
            times.append(time.perf_counter() - started)
        out["screen" if on else "full"] = {"first_s": times[0], "second_s": times[1]}
        del gen
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help=f"one of {', '.join((*MODELS, *EMBEDDED))}")
    p.add_argument("--prompts", type=int, default=100)
    args = p.parse_args(argv)
    if args.model not in MODELS and args.model not in EMBEDDED:
        p.error(f"unknown model {args.model!r}: models are {', '.join((*MODELS, *EMBEDDED))}")
    if args.prompts < 1:
        p.error("--prompts must be at least 1")

    from edgelm.runtime import Generator

    folder = artifact_for(args.model)
    gen = Generator.load(folder)
    if not gen.screens:
        raise SystemExit("this generator's LM head takes no screen")
    result = {"model": args.model, "command": " ".join(["python", *sys.argv]), "machine": machine(),
              "versions": versions(), "commit": commit(),
              "candidates": candidates(gen.art, prompts_for(args.model, args.prompts, gen.tokenizer)),
              "first_call": first_call(folder)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"screen_stats-{args.model.replace(':', '-')}.json").write_text(json.dumps(result, indent=2) + "\n")
    c, f = result["candidates"], result["first_call"]
    print(f"{args.model}: fp32 panels per screened step median {c['candidate_panels_median']:.0f}, at most "
          f"{c['candidate_panels_max']} of {c['panels']} over {c['prompts']} prompts (argmax agrees in "
          f"{c['argmax_agrees']}); first screened call {f['screen']['first_s'] * 1e3:.0f} ms, then "
          f"{f['screen']['second_s'] * 1e3:.0f} ms (screen off: {f['full']['first_s'] * 1e3:.0f} ms, then "
          f"{f['full']['second_s'] * 1e3:.0f} ms)")
    return 0 if c["argmax_agrees"] == c["prompts"] else 1


if __name__ == "__main__":
    sys.exit(main())
