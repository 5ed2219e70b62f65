"""Decode attention: edgelm's CachedAttention against ONNX Runtime's GroupQueryAttention.

    .venv/bin/python benchmarks/attention_bench.py

One decode step's attention for every layer of a model shape (GPT-2 124M: 12 layers of 12 heads of
64; GPT-Neo 2.7B: 32 layers of 20 heads of 128), as one ONNX Runtime run of one node per layer, each
with its own cache buffer bound as past and present (the runtime's IO binding), at several context
lengths. Before every run the CPU caches are flushed by reading 256 MB, as streaming the weights
does in a real decode step. The two operators alternate run by run; medians over --rounds. Also
reported: the cache bytes each step reads divided by the time (GB/s), beside the machine's read
bandwidth (edgelm.bench.machine.measure_bandwidth), measured before and after.
Writes results/attention.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, machine, versions, write_results  # noqa: E402

SHAPES = {"gpt2": (12, 12, 64), "gpt-neo-2.7B": (32, 20, 128)}  # layers, heads, head size
OPS = ("CachedAttention", "GroupQueryAttention")


def _graph(op: str, layers: int, heads: int, head_size: int):
    from onnx import TensorProto, helper

    from edgelm.runtime import native

    f = TensorProto.FLOAT
    nodes, inputs, outputs = [], [helper.make_tensor_value_info("qkv", f, None),
                                  helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, None),
                                  helper.make_tensor_value_info("total", TensorProto.INT32, []),
                                  helper.make_tensor_value_info("bias", f, None)], []
    for i in range(layers):
        past, present = [f"past.{i}.key", f"past.{i}.value"], [f"present.{i}.key", f"present.{i}.value"]
        inputs += [helper.make_tensor_value_info(n, f, None) for n in past]
        outputs += [helper.make_tensor_value_info(n, f, None) for n in [f"y.{i}", *present]]
        if op == "CachedAttention":
            ins, domain = ["qkv", *past, "seqlens_k", "total", "bias"], native.DOMAIN
        else:
            ins, domain = ["qkv", "", "", *past, "seqlens_k", "total", "", "", "", "bias"], "com.microsoft"
        nodes.append(helper.make_node(op, ins, [f"y.{i}", *present], domain=domain, num_heads=heads,
                                      kv_num_heads=heads, scale=head_size ** -0.5))
    graph = helper.make_graph(nodes, op, inputs, outputs)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                   helper.make_opsetid(native.DOMAIN, 1)])


class Step:
    """One decode step at `past` cached tokens: a session and its binding, caches of `past + 1` rows."""

    def __init__(self, op: str, layers: int, heads: int, head_size: int, past: int):
        import onnxruntime as ort

        from edgelm.runtime import native

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        native.register(opts)
        self.sess = ort.InferenceSession(_graph(op, layers, heads, head_size).SerializeToString(), opts,
                                         providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        total = past + 1
        self.caches = [rng.standard_normal((2, 1, heads, total, head_size), dtype=np.float32) for _ in range(layers)]
        self.binding = self.sess.io_binding()
        feeds = {"qkv": rng.standard_normal((1, 1, 3 * heads * head_size), dtype=np.float32),
                 "seqlens_k": np.array([past], np.int32), "total": np.array(total, np.int32),
                 "bias": np.zeros((1, 1, 1, total), np.float32)}
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        for i, cache in enumerate(self.caches):
            for part, buf in zip(("key", "value"), cache):
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                self.binding.bind_ortvalue_input(f"past.{i}.{part}", value)
                self.binding.bind_ortvalue_output(f"present.{i}.{part}", value)
            self.binding.bind_output(f"y.{i}", "cpu")
        self.read_bytes = sum(c.nbytes for c in self.caches)

    def run(self) -> float:
        t = time.perf_counter()
        self.sess.run_with_iobinding(self.binding)
        return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,gpt-neo-2.7B")
    p.add_argument("--contexts", default="32,160,512,1024")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default="attention", help="results/OUT.{json,md,png}")
    args = p.parse_args(argv)

    from edgelm.bench.machine import measure_bandwidth
    from edgelm.runtime import native

    flush = np.ones(64 << 20, np.float32)  # 256 MB
    result = {"command": "python benchmarks/attention_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "versions": versions(), "commit": commit(), "kernel_isa": native.kernel_isa(),
              "rounds": args.rounds, "bandwidth_gbps": [measure_bandwidth()], "rows": []}
    for model in args.models.split(","):
        layers, heads, head_size = SHAPES[model]
        for context in (int(c) for c in args.contexts.split(",")):
            steps = {op: Step(op, layers, heads, head_size, context - 1) for op in OPS}
            times = {op: [] for op in OPS}
            for r in range(args.rounds + 2):
                for op in (OPS if r % 2 == 0 else OPS[::-1]):
                    flush.sum()
                    t = steps[op].run()
                    if r >= 2:  # two warm-up rounds
                        times[op].append(t)
            row = {"model": model, "layers": layers, "heads": heads, "head_size": head_size, "context": context,
                   "cache_bytes": steps[OPS[0]].read_bytes}
            for op in OPS:
                ms = float(np.median(times[op])) * 1e3
                row[op] = {"ms_per_step": ms, "us_per_layer": ms * 1e3 / layers, "gbps": row["cache_bytes"] / ms / 1e6}
            row["speedup"] = row["GroupQueryAttention"]["ms_per_step"] / row["CachedAttention"]["ms_per_step"]
            result["rows"].append(row)
            print(f"{model} context {context}: CachedAttention {row['CachedAttention']['us_per_layer']:.0f} us/layer "
                  f"({row['CachedAttention']['gbps']:.1f} GB/s), GroupQueryAttention "
                  f"{row['GroupQueryAttention']['us_per_layer']:.0f} us/layer: {row['speedup']:.2f}x", flush=True)
    result["bandwidth_gbps"].append(measure_bandwidth())
    print(write_results(RESULTS / args.out, result, _markdown, _plot))
    return 0


def _markdown(r: dict) -> str:
    bw = ", ".join(f"{b:.1f}" for b in r["bandwidth_gbps"])
    lines = [
        "# Decode attention: CachedAttention (edgelm) against GroupQueryAttention (ONNX Runtime)", "",
        f"Command: `{r['command']}` at commit {r['commit']}. Machine: {r['machine']['cpu']}, {r['machine']['cpus']} cores "
        f"({r['machine']['isa']}; edgelm's kernels: {r['kernel_isa']}). Read bandwidth before and after: {bw} GB/s.", "",
        "One decode step's attention over every layer (one ONNX Runtime run, caches bound as past and present), "
        f"CPU caches flushed before each run, the two operators alternating; medians of {r['rounds']} rounds. "
        "GB/s: the cache bytes a step reads over its time.", "",
        "| model | context | cache MB | CachedAttention us/layer | GB/s | GroupQueryAttention us/layer | GB/s | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["rows"]:
        c, g = row["CachedAttention"], row["GroupQueryAttention"]
        lines.append(f"| {row['model']} | {row['context']} | {row['cache_bytes'] / 1e6:.1f} | {c['us_per_layer']:.0f} | "
                     f"{c['gbps']:.1f} | {g['us_per_layer']:.0f} | {g['gbps']:.1f} | {row['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({row["model"] for row in r["rows"]}, key=[row["model"] for row in r["rows"]].index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [row for row in r["rows"] if row["model"] == model]
        ctx = [row["context"] for row in rows]
        for op in OPS:
            ax.plot(ctx, [row[op]["us_per_layer"] for row in rows], marker="o", label=op)
        ax.set_title(f"{model} shape: decode attention per layer")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("µs per layer (cold caches)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
