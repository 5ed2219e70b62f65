"""Memory and time of opening an artifact with edgelm's runtime, each in a fresh process.

    .venv/bin/python benchmarks/load_memory.py [--weights mapped,memory] [--kernels auto,onnxruntime] ART [ART ...]

Prints, per artifact: load seconds, peak RSS during load, RSS after load (of it, anonymous: the
process's own copies, not file pages), weight bytes, and decode tokens/s over 3 short greedy runs
(16 new tokens after a 32-token prompt). Used to compare the conv and MatMul linear layouts
(`edgelm export --linear-layout`) of one model, and a packed artifact's weights mapped or copied
into memory at load (the runtime's --weights; both, one after the other, with --weights mapped,memory),
and a default (conv) artifact on edgelm's kernels (turned into the packed graph as it loads) or on
ONNX Runtime's (the runtime's --kernels, likewise).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, resource, sys, time
import numpy as np
from edgelm.runtime import Generator, SamplingConfig
t = time.perf_counter()
g = Generator.load(sys.argv[1], weights=sys.argv[2], kernels=sys.argv[3])
load_s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rss = int(open("/proc/self/statm").read().split()[1]) * 4096
anon = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:"))
p = np.random.default_rng(0).integers(0, 50000, 32).tolist()
g.generate(p, SamplingConfig(max_new_tokens=4, stop_at_eos=False))
rates = [g.generate(p, SamplingConfig(max_new_tokens=17, stop_at_eos=False)).timings["decode_tokens_per_s"]
         for _ in range(3)]
print(json.dumps({"load_s": load_s, "peak_rss": peak, "rss_after_load": rss, "anon_after_load": anon, "decode": rates,
                  "weight_bytes": g.art.manifest["graph"]["weight_bytes"],
                  "layout": g.art.manifest["graph"].get("linear_layout"), "kernels": g.art.kernels}))
"""


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--weights", default="mapped",
                   help="the runtime's --weights: mapped, memory, or both as mapped,memory (default mapped)")
    p.add_argument("--kernels", default="auto",
                   help="the runtime's --kernels: auto, edgelm, onnxruntime, or several, comma-separated (default auto)")
    args = p.parse_args(argv)
    from edgelm.runtime.artifact import KERNELS, WEIGHT_PLACEMENTS

    placements, kernels = args.weights.split(","), args.kernels.split(",")
    if not set(placements) <= set(WEIGHT_PLACEMENTS):
        p.error(f"--weights {args.weights}: give mapped, memory or mapped,memory")
    if not set(kernels) <= set(KERNELS):
        p.error(f"--kernels {args.kernels}: give some of {', '.join(KERNELS)}, comma-separated")
    for art, weights, kind in ((a, w, k) for a in args.artifacts for w in placements for k in kernels):
        run = subprocess.run([sys.executable, "-c", WORKER, art, weights, kind], cwd=ROOT, capture_output=True, text=True)
        if run.returncode:
            print(f"{art} (weights {weights}, kernels {kind}): {(run.stderr.strip().splitlines() or ['failed'])[-1]}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{art} ({r['layout']}, weights {weights}, kernels {kind} -> {r['kernels']}): load {r['load_s']:.1f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB, "
              f"RSS after load {r['rss_after_load'] / 1e9:.2f} GB (anonymous {r['anon_after_load'] / 1e9:.2f}) "
              f"for {r['weight_bytes'] / 1e9:.2f} GB of weights, "
              f"decode {', '.join(f'{x:.2f}' for x in r['decode'])} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
