"""How close can any fp32 ONNX Runtime graph get to the memory-bandwidth ceiling on this machine?

    .venv/bin/python benchmarks/matmul_bandwidth.py

Decoding one token multiplies a (1, K) row by every weight matrix, so fp32 decode speed is bounded
by how fast ONNX Runtime's MatMul streams a weight matrix at M = 1. This times the GPT-2 124M LM
head (768 x 50257, 154 MB) as MatMul, Gemm(transB) and com.microsoft FusedMatMul(transB), with and
without prepacking, beside the machine's read bandwidth measured the same way as the runtime
benchmark's ceiling (edgelm.bench.machine.measure_bandwidth).

Then the 48 projections of GPT-2 124M (random weights, real shapes, 340 MB) one after another, in
the three linear layouts edgelm exports: MatMul(x, W[K, N]), the 1x1 Conv form
(Reshape -> Transpose -> Conv -> Transpose -> Reshape, which ONNX Runtime runs as NCHWc) and
edgelm's PackedLinear over 16-column panels (when its operator library is built), in interleaved
rounds with the bandwidth measured between rounds. Writes results/matmul_bandwidth.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def time_graph(node, weight, x_shape, prepack: bool, threads: int = 0) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(50):
            sess.run(None, {"x": x})
        best = min(best, (time.perf_counter() - t) / 50)
    return best


def main() -> int:
    from onnx import helper

    from edgelm.bench.machine import measure_bandwidth

    k, n = 768, 50257
    w = (np.random.default_rng(1).standard_normal((k, n)) * 0.02).astype(np.float32)
    wt = np.ascontiguousarray(w.T)
    bandwidth = measure_bandwidth()
    rows = []
    cases = [("MatMul W[K,N]", helper.make_node("MatMul", ["x", "W"], ["y"]), w, [1, 1, k]),
             ("Gemm transB W[N,K]", helper.make_node("Gemm", ["x", "W"], ["y"], transB=1), wt, [1, k]),
             ("FusedMatMul transB W[N,K]",
              helper.make_node("FusedMatMul", ["x", "W"], ["y"], domain="com.microsoft", transB=1), wt, [1, 1, k])]
    for name, node, weight, shape in cases:
        for prepack in (True, False):
            sec = time_graph(node, weight, shape, prepack)
            rows.append({"op": name, "prepack": prepack, "ms": sec * 1e3, "gbps": w.nbytes / sec / 1e9,
                         "fraction_of_ceiling": w.nbytes / sec / 1e9 / bandwidth})
            print(f"{name:28s} prepack={prepack!s:5s} {sec * 1e3:6.2f} ms  {rows[-1]['gbps']:5.1f} GB/s  "
                  f"{rows[-1]['fraction_of_ceiling'] * 100:4.0f}% of {bandwidth:.1f} GB/s")
    chain = projection_chain()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "matmul_bandwidth.json").write_text(json.dumps(
        {"bandwidth_gbps": bandwidth, "weight_bytes": int(w.nbytes), "rows": rows, "projection_chain": chain},
        indent=2) + "\n")
    return 0


def chain_model(layout: str, layers: int = 12, d: int = 768):
    """Every projection of a GPT-2 layer stack, each on its own input, in one graph (batch 1, 1 token)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    nodes, inputs, outputs, inits = [], [], [], []
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * layers
    for i, (k, n) in enumerate(shapes):
        w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02)
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 1, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
        if layout == "matmul":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
            continue
        if layout == "packed":
            from edgelm.runtime.native import DOMAIN, pack_panels

            inits.append(numpy_helper.from_array(pack_panels(w), f"w{i}"))
            nodes.append(helper.make_node("PackedLinear", [f"x{i}", f"w{i}"], [f"y{i}"], domain=DOMAIN, n=n))
            continue
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.T).reshape(n, k, 1, 1), f"w{i}"),
                  numpy_helper.from_array(np.array([1, -1, 1, k], np.int64), f"s{i}"),
                  numpy_helper.from_array(np.array([1, -1, n], np.int64), f"o{i}")]
        nodes += [helper.make_node("Reshape", [f"x{i}", f"s{i}"], [f"r{i}"]),
                  helper.make_node("Transpose", [f"r{i}"], [f"t{i}"], perm=[0, 3, 1, 2]),
                  helper.make_node("Conv", [f"t{i}", f"w{i}"], [f"c{i}"]),
                  helper.make_node("Transpose", [f"c{i}"], [f"u{i}"], perm=[0, 2, 3, 1]),
                  helper.make_node("Reshape", [f"u{i}", f"o{i}"], [f"y{i}"])]
    graph = helper.make_graph(nodes, "chain", inputs, outputs, inits)
    from edgelm.runtime.native import DOMAIN

    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(DOMAIN, 1)] if layout == "packed" else [])
    return helper.make_model(graph, ir_version=10, opset_imports=opsets), sum(k * n * 4 for k, n in shapes)


def projection_chain(rounds: int = 20, runs: int = 5) -> dict:
    import onnxruntime as ort

    from edgelm.bench.machine import measure_bandwidth

    from edgelm.runtime import native

    sessions, nbytes = {}, 0
    for layout in ("matmul", "conv") + (("packed",) if native.library_path() else ()):
        model, nbytes = chain_model(layout)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if layout == "packed":
            native.register(opts)
        sessions[layout] = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = {s.name: np.random.default_rng(3).standard_normal(s.shape).astype(np.float32)
         for s in sessions["matmul"].get_inputs()}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, x)
    seconds = {k: [] for k in sessions}
    bandwidths = [measure_bandwidth(passes=3)]
    rng = np.random.default_rng(4)
    for _ in range(rounds):
        for layout in rng.permutation(list(sessions)):
            sessions[layout].run(None, x)  # the first run after the 1 GiB read is slow: untimed
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sessions[layout].run(None, x)
                times.append(time.perf_counter() - t)
            seconds[str(layout)].append(float(np.median(times)))
        bandwidths.append(measure_bandwidth(passes=3))
    best = [max(a, b) for a, b in zip(bandwidths, bandwidths[1:])]
    out = {"weight_bytes": nbytes, "rounds": rounds, "bandwidth_gbps_between_rounds": bandwidths}
    for layout, secs in seconds.items():
        fractions = [nbytes / s / 1e9 / b for s, b in zip(secs, best)]
        out[layout] = {"ms_median": float(np.median(secs)) * 1e3, "gbps_median": nbytes / float(np.median(secs)) / 1e9,
                       "fraction_of_ceiling_median": float(np.median(fractions))}
        print(f"chain {layout:6s} {out[layout]['ms_median']:6.2f} ms  {out[layout]['gbps_median']:5.1f} GB/s  "
              f"{out[layout]['fraction_of_ceiling_median'] * 100:4.0f}% of the bandwidth around each round")
    out["conv_speedup_median"] = float(np.median(np.array(seconds["matmul"]) / np.array(seconds["conv"])))
    print(f"conv / matmul speed-up, median over rounds: {out['conv_speedup_median']:.3f}x")
    if "packed" in seconds:
        out["packed_over_conv_median"] = float(np.median(np.array(seconds["conv"]) / np.array(seconds["packed"])))
        print(f"packed / conv speed-up, median over rounds: {out['packed_over_conv_median']:.3f}x")
    return out


if __name__ == "__main__":
    sys.exit(main())
