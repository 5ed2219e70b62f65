"""How close can any fp32 ONNX Runtime graph get to the memory-bandwidth ceiling on this machine?

    .venv/bin/python benchmarks/matmul_bandwidth.py

Decoding one token multiplies a (1, K) row by every weight matrix, so fp32 decode speed is bounded
by how fast ONNX Runtime's MatMul streams a weight matrix at M = 1. This times the GPT-2 124M LM
head (768 x 50257, 154 MB) as MatMul, Gemm(transB) and com.microsoft FusedMatMul(transB), with and
without prepacking, beside the machine's read bandwidth measured the same way as the runtime
benchmark's ceiling (edgelm.bench.machine.measure_bandwidth). Writes results/matmul_bandwidth.json.
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
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
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
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "matmul_bandwidth.json").write_text(json.dumps(
        {"bandwidth_gbps": bandwidth, "weight_bytes": int(w.nbytes), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
