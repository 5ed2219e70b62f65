"""Where a decode step's time goes: ONNX Runtime's operator profile of edgelm's runtime on one artifact.

    .venv/bin/python benchmarks/op_profile.py --model gpt2 --layout packed

Exports (or reuses) the random-weight builder artifact of --model in --layout, generates --runs
times (32-token prompt, 64 greedy new tokens) with ONNX Runtime's profiler on, and sums kernel time
per operator type, and per node with every layer's nodes together, over every run, prompt steps
included. Profiling adds its own cost to every
node, so read the shares, not the absolute times. Writes results/op_profile-MODEL-LAYOUT.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, machine, versions  # noqa: E402
from configs import MODELS  # noqa: E402
from random_checkpoint import ensure_model_folder  # noqa: E402
from runtime_bench import CACHE, cached_artifact, load_as_exported  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    p.add_argument("--layout", default="packed", choices=["conv", "matmul", "packed"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    import onnxruntime as ort

    from edgelm.runtime import SamplingConfig
    from edgelm.runtime import artifact as runtime_artifact

    model_dir = CACHE / args.model
    ensure_model_folder(MODELS[args.model][1], model_dir)
    art = cached_artifact(model_dir, args.model, args.layout)

    class Profiled:  # the runtime's ONNX Runtime, with the profiler switched on in its session options
        def __getattr__(self, name):
            return getattr(ort, name)

        def SessionOptions(self):  # noqa: N802 (ONNX Runtime's name)
            opts = ort.SessionOptions()
            opts.enable_profiling = True
            opts.profile_file_prefix = str(CACHE / "op_profile")
            return opts

    real = runtime_artifact._ort
    runtime_artifact._ort = lambda: Profiled()
    try:
        gen = load_as_exported(art)
    finally:
        runtime_artifact._ort = real
    prompt = list(range(100, 132))
    for _ in range(args.runs):
        gen.generate(prompt, SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False))
    trace = Path(gen.art.session.end_profiling())
    events = json.loads(trace.read_text())
    os.remove(trace)

    per_op, calls, run_us, runs = collections.Counter(), collections.Counter(), 0, 0
    per_node, node_calls = collections.Counter(), collections.Counter()  # nodes of every layer together
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
            node = re.sub(r"layers\.\d+", "layers.*", e["name"].removesuffix("_kernel_time"))
            per_node[node] += e["dur"]
            node_calls[node] += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            run_us += e["dur"]
            runs += 1
    kernels = sum(per_op.values())
    result = {"model": args.model, "layout": args.layout, "session_runs": runs, "command": " ".join(["python", *sys.argv]),
              "machine": machine(), "versions": versions(), "commit": commit(),
              "model_run_ms": run_us / 1e3, "kernel_ms": kernels / 1e3, "kernel_share_of_run": kernels / run_us,
              "operators": {op: {"ms": us / 1e3, "share_of_kernels": us / kernels, "calls": calls[op]}
                            for op, us in per_op.most_common()},
              "nodes": {node: {"ms": us / 1e3, "share_of_kernels": us / kernels, "calls": node_calls[node]}
                        for node, us in per_node.most_common()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"op_profile-{args.model}-{args.layout}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} {args.layout}: {runs} runs, {run_us / 1e3:.0f} ms in model_run, "
          f"{kernels / run_us:.0%} of it in operators")
    for op, us in per_op.most_common(8):
        print(f"  {op:26s} {us / 1e3:8.1f} ms  {us / kernels:6.1%}  {calls[op]} calls")
    print("nodes (every layer's together):")
    for node, us in per_node.most_common(8):
        print(f"  {node:60s} {us / 1e3:8.1f} ms  {us / kernels:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
