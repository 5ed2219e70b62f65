"""Where a packed decode step's time goes beyond streaming the weights.

    .venv/bin/python benchmarks/step_breakdown.py [--model gpt2] [--rounds 8]

In one process, round after round, six timings of the same weights:
- probe: the read probe's bandwidth (edgelm.bench.machine.measure_bandwidth, best of 3 passes) as the
  time to read the step's linear weights;
- read: those bytes read by the probe's fastest reader on every core (edgelm.bench.machine.timed_read),
  the median of 20 reads: like projections a median, where the probe is the best of several passes;
- projections: every PackedLinear of the packed artifact (the 48 projections and the LM head, the same
  panels) as one ONNX Runtime graph of unconnected nodes, each on a constant input: the weights
  streamed with nothing else in the step;
- model run: the artifact's ONNX Runtime run per decode step inside edgelm's generation loop (128
  greedy tokens after a 32-token prompt), median over the decode steps;
- step: the time from one decode step's run to the next in that generation, median (adds the
  Python loop);
- loop alone: the same generation with ONNX Runtime's run replaced by nothing, so the Python loop runs
  with warm caches (in a real step the weights have just flushed them).
The differences between them, paired within a round, are the time attention, the graph's small
operators and ONNX Runtime's per-node work (model run - projections) and the Python loop (step -
model run) add to the weights' streaming; step against read is the step's share of the speed of
memory in the same seconds. Writes results/step_breakdown-MODEL.json (--out names another file).
"""

from __future__ import annotations

import argparse
import json
import os
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
from runtime_bench import CACHE, cached_artifact  # noqa: E402


def _projections(folder: Path):
    """The artifact's PackedLinear nodes as one graph of unconnected nodes; its feeds; weight bytes."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgelm.runtime import native

    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    nodes, inputs, outputs, weights, feeds, nbytes = [], [], [], [], {}, 0
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "PackedLinear"):
        w = numpy_helper.to_array(inits[node.input[1]])
        n = next(a.i for a in node.attribute if a.name == "n")
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 1, w.shape[1]]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("PackedLinear", [f"x{i}", f"w{i}"], [f"y{i}"], domain=native.DOMAIN, n=n))
        feeds[f"x{i}"] = np.full((1, 1, w.shape[1]), 0.01, np.float32)
        nbytes += w.nbytes
    graph = helper.make_graph(nodes, "projections", inputs, outputs, weights)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    native.register(opts)
    m = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]), feeds, nbytes


class _Timed:
    """The artifact's session with run_with_iobinding timed: when each call began and how long it took."""

    def __init__(self, inner):
        self.inner, self.times, self.starts = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    skip = False  # True: the loop alone, no model

    def run_with_iobinding(self, binding, *args):
        start = time.perf_counter()
        self.starts.append(start)
        if not self.skip:
            self.inner.run_with_iobinding(binding, *args)
        self.times.append(time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", help="results file name without .json (default step_breakdown-MODEL)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    from concurrent.futures import ThreadPoolExecutor

    from edgelm.bench.machine import measure_bandwidth, read_kernels, timed_read
    from edgelm.runtime.generator import Generator
    from edgelm.runtime.sampling import SamplingConfig

    model_dir = CACHE / args.model
    ensure_model_folder(MODELS[args.model][1], model_dir)
    folder = cached_artifact(model_dir, args.model, "packed")
    chain, feeds, nbytes = _projections(folder)
    gen = Generator.load(folder)
    timed = _Timed(gen.art.session)
    gen.art.session = timed
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 50000, 32)]
    cfg = SamplingConfig(max_new_tokens=128, greedy=True, stop_at_eos=False)
    gen.generate(prompt, cfg)
    chain.run(None, feeds)
    names = ("probe", "read", "projections", "model run", "step", "loop alone")
    ms = {k: [] for k in names}
    threads = os.cpu_count() or 1
    pool, buf = ThreadPoolExecutor(threads), np.ones(nbytes // 4, dtype=np.float32)
    read = read_kernels()[-1]  # the fastest reader, as runtime_bench's memory-read
    for r in range(args.rounds):
        ms["probe"].append(nbytes / (measure_bandwidth(passes=3) * 1e9) * 1e3)
        ms["read"].append(float(np.median([timed_read(pool, threads, read, buf) for _ in range(20)])) * 1e3)
        runs = []
        for _ in range(20):
            start = time.perf_counter()
            chain.run(None, feeds)
            runs.append(time.perf_counter() - start)
        ms["projections"].append(float(np.median(runs)) * 1e3)
        timed.times, timed.starts = [], []
        gen.generate(prompt, cfg)
        # medians, as for the reads and the projections: a mean takes in the shared machine's stalls
        ms["model run"].append(float(np.median(timed.times[1:])) * 1e3)
        ms["step"].append(float(np.median(np.diff(timed.starts[1:]))) * 1e3)  # one decode step to the next
        timed.skip = True
        ms["loop alone"].append(1e3 / gen.generate(prompt, cfg).timings["decode_tokens_per_s"])
        timed.skip = False
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {ms[k][-1]:.2f} ms" for k in names), flush=True)
    arr = {k: np.array(v) for k, v in ms.items()}
    result = {
        "command": "python benchmarks/step_breakdown.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "versions": versions(), "commit": commit(), "model": args.model,
        "linear_weight_bytes": nbytes, "ms": ms,
        "median_ms": {k: float(np.median(v)) for k, v in arr.items()},
        "paired_median_ms": {
            "projections - probe": float(np.median(arr["projections"] - arr["probe"])),
            "projections - read": float(np.median(arr["projections"] - arr["read"])),
            "model run - projections": float(np.median(arr["model run"] - arr["projections"])),
            "step - model run": float(np.median(arr["step"] - arr["model run"])),
        },
        "projections_of_probe_median": float(np.median(arr["probe"] / arr["projections"])),
        "step_of_probe_median": float(np.median(arr["probe"] / arr["step"])),
        "projections_of_read_median": float(np.median(arr["read"] / arr["projections"])),
        "step_of_read_median": float(np.median(arr["read"] / arr["step"])),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out or 'step_breakdown-' + args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_ms", "paired_median_ms", "projections_of_probe_median",
                                             "step_of_probe_median", "projections_of_read_median",
                                             "step_of_read_median")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
