"""What every benchmark records beside its numbers: the machine, the package versions, the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    flags: set[str] = set()
    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags)
    return {"cpu": cpu, "cpus": os.cpu_count(), "ram_gb": round(ram, 1), "isa": isa, "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()[0]}


def versions() -> dict:
    from edgelm.bench.machine import versions as package_versions

    return package_versions()


def write_results(stem: Path, result: dict, markdown, plot) -> str:
    """stem.json, stem.md (``markdown(result)``) and stem.png (``plot(result, path)``); returns the Markdown."""
    import json

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    plot(result, stem.with_suffix(".png"))
    return text


def commit(*paths: str) -> str:
    """HEAD's short hash, marked '+modified' when ``paths`` (default edgelm/) have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *(paths or ("edgelm",))], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+modified" if dirty else "")


def decode_ab_args(description: str, argv=None, extra=()):
    """The arguments of a decode A/B over one random-weight model (kernels_ab, screen_ab): --model,
    --rounds, --new-tokens, checked, and ``extra`` whole-number flags ((flag, default, help), each at
    least 1); returns the parsed namespace."""
    import argparse

    from configs import MODELS

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="gpt2", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=33)
    for flag, default, help in extra:
        p.add_argument(flag, type=int, default=default, help=help)
    args = p.parse_args(argv)
    if args.model not in MODELS:
        p.error(f"unknown model {args.model!r}: models are {', '.join(MODELS)}")
    if args.rounds < 1 or args.new_tokens < 2:
        p.error("--rounds must be at least 1 and --new-tokens at least 2")
    for flag, _, _ in extra:
        if getattr(args, flag.lstrip("-").replace("-", "_")) < 1:
            p.error(f"{flag} must be at least 1")
    return args


def interleaved_decode_rounds(gens: dict, rounds: int, new_tokens: int = 33, warmup_tokens: int = 4,
                              batch: int = 1) -> dict:
    """Decode tokens per second of each edgelm Generator in ``gens`` ({name: generator}), ``rounds``
    times, the generators in a fresh shuffled order each round: the same 32 random prompt tokens
    (``batch`` > 1: that many prompts of 32, one batch), greedy, EOS ignored, after one warm-up
    generation each. Returns {name: [tok/s per round]} (a batch's: every row's tokens)."""
    import numpy as np

    from edgelm.runtime import SamplingConfig

    names = list(gens)
    prompts = np.random.default_rng(0).integers(0, 50000, (batch, 32)).tolist()
    prompt = prompts[0] if batch == 1 else prompts
    cfg = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    for g in gens.values():
        g.generate(prompt, SamplingConfig(max_new_tokens=warmup_tokens, stop_at_eos=False))
    rng = np.random.default_rng(1)
    rates: dict = {name: [] for name in names}
    for _ in range(rounds):
        for i in rng.permutation(len(names)):
            result = gens[names[i]].generate(prompt, cfg)
            rates[names[i]].append((result if batch == 1 else result[0]).timings["decode_tokens_per_s"])
    return rates


def per_round_ratio(rates: dict, base: str, other: str) -> dict:
    """rates[other] / rates[base] round by round: median, quartiles and the rounds ``other`` won."""
    import numpy as np

    ratio = np.array(rates[other]) / np.array(rates[base])
    return {"median": float(np.median(ratio)), "q25": float(np.quantile(ratio, 0.25)),
            "q75": float(np.quantile(ratio, 0.75)), f"rounds_{other}_faster": int((ratio > 1).sum())}


def ab_record(model: str, rounds: int, new_tokens: int, started: float, rates: dict, pairs: list, **extra) -> dict:
    """The record of an interleaved A/B (kernels_ab, layout_ab): the run's facts, the per-round
    rates and their medians, and ``{other}_over_{base}`` (per_round_ratio) for each (base, other)."""
    import sys
    import time

    import numpy as np

    return {"model": model, "rounds": rounds, "new_tokens": new_tokens, "seconds": round(time.time() - started),
            "command": " ".join(["python", *sys.argv]), "machine": machine(), "versions": versions(),
            "commit": commit(), **extra, "decode_tokens_per_s": rates,
            "median_tokens_per_s": {k: float(np.median(v)) for k, v in rates.items()},
            **{f"{other}_over_{base}": per_round_ratio(rates, base, other) for base, other in pairs}}


def ab_line(result: dict, base: str, other: str, label: str = "") -> str:
    """One line of an A/B record for the terminal: both medians and the per-round ratio."""
    c, med = result[f"{other}_over_{base}"], result["median_tokens_per_s"]
    return (f"{label or result['model']}: {other} {med[other]:.1f} tok/s, {base} {med[base]:.1f} tok/s (medians); "
            f"{other}/{base} per round: median {c['median']:.3f}, quartiles {c['q25']:.3f}-{c['q75']:.3f}, "
            f"{other} faster in {c[f'rounds_{other}_faster']} of {result['rounds']} rounds")
