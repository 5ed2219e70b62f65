"""The read probe's readers against one another: which way of reading memory draws the most here.

    .venv/bin/python benchmarks/read_probe.py [--rounds 15] [--gib 1]

The memory-bandwidth ceiling of every benchmark is the best pass of the probe's readers
(edgelm.bench.machine.read_kernels, measure_bandwidth). A ceiling from a reader that draws less
than the decode's own access pattern would flatter every "share of the ceiling", so this times each
reader on one buffer, all cores, readers in shuffled order within each round, and reports each
one's median, best and median per-round ratio to edgelm's vector sum over slices. Writes
results/read_probe.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, machine, versions  # noqa: E402

READERS = ["numpy sum, slices", "64-bit OR, slices", "edgelm sum, slices", "edgelm sum, interleaved chunks"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--gib", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.rounds < 1 or not args.gib > 0:
        p.error("--rounds must be at least 1 and --gib above 0")

    from edgelm.bench.machine import read_kernels, timed_read

    threads = os.cpu_count() or 1
    buf = np.ones(int(args.gib * (1 << 30)) // 4, dtype=np.float32)
    readers = dict(zip(READERS, read_kernels()))  # without edgelm's library: the first two only
    gbps = {name: [] for name in readers}
    with ThreadPoolExecutor(threads) as pool:
        for r in range(args.rounds):
            for name in random.sample(list(readers), len(readers)):
                gbps[name].append(buf.nbytes / timed_read(pool, threads, readers[name], buf) / 1e9)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in gbps.items()), flush=True)
    base = READERS[2] if READERS[2] in gbps else READERS[0]
    summary = {name: {"median_gbps": float(np.median(v)), "best_gbps": float(max(v)),
                      "paired_vs_" + base: float(np.median(np.array(v) / np.array(gbps[base])))}
               for name, v in gbps.items()}
    result = {"command": "python benchmarks/read_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "versions": versions(), "commit": commit(), "threads": threads,
              "buffer_bytes": buf.nbytes, "gbps": gbps, "summary": summary}
    lines = ["# Read probe: its readers against one another", "", f"Command: `{result['command']}` (commit "
             f"{result['commit']}). Machine: {result['machine']['cpu']}, {threads} threads, "
             f"{result['machine']['isa']}.", "",
             f"| reader | median GB/s | best GB/s | per-round ratio to {base} (median) |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {s['median_gbps']:.1f} | {s['best_gbps']:.1f} | {s['paired_vs_' + base]:.3f} |"
              for k, s in summary.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "read_probe.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "read_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
