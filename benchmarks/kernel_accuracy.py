"""Rounding of edgelm's PackedLinear kernels against float64, beside ONNX Runtime's own operators.

    .venv/bin/python benchmarks/kernel_accuracy.py

GELU (tanh form) on 200,000 values ~ N(0, 3^2): edgelm_gelu_tanh, ONNX Runtime's FastGelu and numpy
in float32. Linear y = x W with K = N = 2560 (GPT-Neo 2.7B's width), M = 1 (decode) and 32 (prompt):
edgelm_linear against ONNX Runtime's MatMul. Max and RMS error against float64; writes
results/kernel_accuracy.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, machine, versions  # noqa: E402


def _errors(got, exact) -> dict:
    diff = got.astype(np.float64) - exact
    return {"max_abs": float(np.abs(diff).max()), "rms": float(np.sqrt(np.mean(diff ** 2)))}


def _session(node, inits=()):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def main() -> int:
    from onnx import helper, numpy_helper

    from edgelm.runtime import native

    lib = native.kernels()
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(200_000) * 3).astype(np.float32)
    v64 = v.astype(np.float64)
    exact = 0.5 * v64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v64 + 0.044715 * v64 ** 3)))
    ours = v.copy()
    lib.edgelm_gelu_tanh(ours.ctypes.data, ours.size)
    fast_gelu = _session(helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")).run(None, {"x": v})[0]
    c = np.float32(np.sqrt(2 / np.pi))
    numpy32 = 0.5 * v * (1 + np.tanh(c * (v + np.float32(0.044715) * v ** 3)))
    result = {"command": "python benchmarks/kernel_accuracy.py", "machine": machine(), "versions": versions(),
              "commit": commit(), "kernel_isa": native.kernel_isa(),
              "gelu": {"edgelm": _errors(ours, exact), "onnxruntime_fastgelu": _errors(fast_gelu, exact),
                       "numpy_float32": _errors(numpy32, exact)},
              "linear_k2560": {}}
    k = n = 2560
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    matmul = _session(helper.make_node("MatMul", ["x", "W"], ["y"]), [numpy_helper.from_array(w, "W")])
    packed = native.pack_panels(w)
    for m in (1, 32):
        x = rng.standard_normal((m, k)).astype(np.float32)
        exact = x.astype(np.float64) @ w.astype(np.float64)
        y = np.empty((m, n), np.float32)
        lib.edgelm_linear(x.ctypes.data, m, k, packed.ctypes.data, None, y.ctypes.data, n)
        result["linear_k2560"][f"m{m}"] = {"edgelm": _errors(y, exact),
                                           "onnxruntime_matmul": _errors(matmul.run(None, {"x": x})[0], exact)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernel_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, e in result["gelu"].items():
        print(f"gelu   {name:22s} max {e['max_abs']:.2e}  rms {e['rms']:.2e}")
    for m, pair in result["linear_k2560"].items():
        for name, e in pair.items():
            print(f"linear {m:4s} {name:17s} max {e['max_abs']:.2e}  rms {e['rms']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
