"""edgelm's operator library: the packed linear kernels against numpy, and PackedLinear inside ONNX Runtime."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgelm.runtime import native

pytestmark = pytest.mark.skipif(native.library_path() is None, reason="edgelm's operator library is not built")

# odd sizes reach every tail: a last panel of 1-15 columns, K not a multiple of 4, 1-6 rows
SHAPES = [(37, 17), (64, 16), (768, 50), (5, 3), (33, 40), (20, 100)]  # 2, 1, 4, 1, 3 and 7 panels


def _linear(x, packed, bias, n):
    m, k = x.shape
    y = np.full((m, n), np.nan, np.float32)
    native.kernels().edgelm_linear(x.ctypes.data, m, k, packed.ctypes.data,
                                   None if bias is None else bias.ctypes.data, y.ctypes.data, n)
    return y


def test_pack_and_unpack_are_inverse():
    w = np.random.default_rng(0).standard_normal((9, 35)).astype(np.float32)
    packed = native.pack_panels(w)
    assert packed.shape == (3, 9, 16) and not packed[2, :, 3:].any()  # 35 = 2 * 16 + 3: zero padding
    assert np.array_equal(packed[1, 4], w[4, 16:32])
    assert np.array_equal(native.unpack_panels(packed, 35), w)


def test_the_library_packs_any_layout_as_numpy_does(monkeypatch):
    """From a [K, N] weight, the transpose of a Conv's [N, K] one (the rewrite at load), a slice of a
    wider one and a float64 one (numpy's path), at sizes with a short last panel and K past one block
    of 64 rows."""
    rng = np.random.default_rng(2)
    views = [rng.standard_normal((k, n)).astype(np.float32) for k, n in SHAPES + [(130, 33)]]
    views += [rng.standard_normal((n, k)).astype(np.float32).T for k, n in SHAPES + [(130, 33)]]
    views += [rng.standard_normal((70, 90)).astype(np.float32)[3:60, 5:84], rng.standard_normal((9, 20))]
    packed = [native.pack_panels(w) for w in views]
    monkeypatch.setattr(native, "library_path", lambda: None)
    for w, got in zip(views, packed):
        want = native.pack_panels(w)
        assert got.shape == want.shape and got.dtype == want.dtype and got.flags.c_contiguous
        assert np.array_equal(got, want) and np.array_equal(native.unpack_panels(got, w.shape[1]), w)


def _gelu_tanh(v):
    v = v.astype(np.float64)
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


def test_kernel_matches_numpy():
    v = np.concatenate([np.linspace(-30, 30, 20001), [0.0, -1e-30, 1e-30, 88.0, -88.0, 1e4, -1e4]]).astype(np.float32)
    y = v.copy()
    native.kernels().edgelm_gelu_tanh(y.ctypes.data, y.size)
    np.testing.assert_allclose(y, _gelu_tanh(v), rtol=2e-6, atol=5e-7)  # float32 reach
    rng = np.random.default_rng(1)
    for k, n in SHAPES:
        w = rng.standard_normal((k, n)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        packed = native.pack_panels(w)
        for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13):  # 4- and 6-row blocks and every remainder
            x = rng.standard_normal((m, k)).astype(np.float32)
            np.testing.assert_allclose(_linear(x, packed, b, n), x @ w + b, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(_linear(x, packed, None, n), x @ w, rtol=1e-4, atol=1e-4)


def _with_isa(test: str, isa: str) -> None:
    """Run this module's ``test`` in a fresh process on the lesser kernels ``isa`` (EDGELM_KERNEL_ISA)."""
    code = (f"import tests.test_native as t; from edgelm.runtime import native; t.{test}(); "
            "print(native.kernel_isa())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EDGELM_KERNEL_ISA": isa},
                         capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] in (isa, "generic")  # a CPU without AVX2 runs the generic kernel


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_kernel_matches_numpy(isa):
    """The lesser kernels (picked with EDGELM_KERNEL_ISA) give the same results, in a fresh process."""
    _with_isa("test_kernel_matches_numpy", isa)


def _decode_outputs() -> np.ndarray:
    """One row against every shape of SHAPES (every tail of 1 to 4 panels at once), with and without bias."""
    rng = np.random.default_rng(2)
    out = []
    for k, n in SHAPES:
        packed = native.pack_panels(rng.standard_normal((k, n)).astype(np.float32))
        b, x = rng.standard_normal(n).astype(np.float32), rng.standard_normal((1, k)).astype(np.float32)
        out += [_linear(x, packed, b, n).ravel(), _linear(x, packed, None, n).ravel()]
    return np.concatenate(out)


def test_avx512_decode_gives_the_avx2_kernels_bits(tmp_path):
    """Both decode loops read 4 panels at once and add in the same order: the same floats, bit for bit."""
    if native.kernel_isa() != "avx512f":
        pytest.skip("this CPU has no AVX-512")
    code = ("import numpy as np, sys, tests.test_native as t; from edgelm.runtime import native; "
            "assert native.kernel_isa() == 'avx2'; np.save(sys.argv[1], t._decode_outputs())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "avx2.npy")],
                         env={**os.environ, "EDGELM_KERNEL_ISA": "avx2"}, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.array_equal(_decode_outputs(), np.load(tmp_path / "avx2.npy"))


def test_read_sum_reads_every_float():
    x = np.random.default_rng(2).standard_normal(1000 * 64 + 13).astype(np.float32)
    total = native.kernels().edgelm_read_sum(x.ctypes.data, x.size)
    assert total == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-4, abs=1e-2)
    assert native.kernel_isa() in ("avx512f", "avx2", "generic")


def _session(n, k, bias: bool, packed=None, **attrs):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    inits = [numpy_helper.from_array(native.pack_panels(w) if packed is None else packed, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(b, "B"))
        inputs.append("B")
    node = helper.make_node("PackedLinear", inputs, ["y"], domain=native.DOMAIN, n=n, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])
    opts = ort.SessionOptions()
    native.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), w, b


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_runs_in_onnx_runtime(bias):
    rng = np.random.default_rng(4)
    for k, n in SHAPES:
        sess, w, b = _session(n, k, bias)
        for shape in [(1, 1, k), (2, 7, k), (3, k), (1, 0, k)]:  # decode, a batch of prompts, 2-D, no rows
            x = rng.standard_normal(shape).astype(np.float32)
            y = sess.run(None, {"x": x})[0]
            assert y.shape == shape[:-1] + (n,)
            np.testing.assert_allclose(y, x @ w + (b if bias else 0), rtol=1e-4, atol=1e-4)


def test_packed_linear_applies_gelu():
    rng = np.random.default_rng(5)
    for k, n in SHAPES:
        sess, w, b = _session(n, k, True, activation=1)
        for shape in [(1, 1, k), (2, 7, k)]:
            x = rng.standard_normal(shape).astype(np.float32)
            np.testing.assert_allclose(sess.run(None, {"x": x})[0], _gelu_tanh(x @ w + b), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="activation 7 is not 0"):
        _session(17, 37, True, activation=7)


def test_packed_linear_rejects_mismatched_shapes():
    sess, _, _ = _session(17, 37, True)
    with pytest.raises(Exception, match="X has 36 features, W has 37"):
        sess.run(None, {"x": np.zeros((1, 36), np.float32)})
    with pytest.raises(Exception, match=r"W must be \(2, K, 16\) panels for n = 17"):
        _session(17, 37, False, packed=np.zeros((1, 37, 16), np.float32))[0].run(None, {"x": np.zeros((1, 37), np.float32)})


def test_kernel_rounds_no_worse_than_onnx_runtime():
    """Long sums (K = 2560, GPT-Neo 2.7B) in blocks: a running sum over all of K rounded worse than
    ONNX Runtime's MatMul, enough to fail the export's validation of a 32-layer model."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    k = n = 2560
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
    sess = ort.InferenceSession(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    packed = native.pack_panels(w)
    for m in (1, 32):
        x = rng.standard_normal((m, k)).astype(np.float32)
        exact = x.astype(np.float64) @ w.astype(np.float64)
        ours = np.sqrt(np.mean((_linear(x, packed, None, n) - exact) ** 2))
        theirs = np.sqrt(np.mean((sess.run(None, {"x": x})[0] - exact) ** 2))
        assert ours <= 1.25 * theirs, (m, ours, theirs)


def _fused_session(k, n, inputs, outputs, eps=1e-5):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = rng.standard_normal((k, n)).astype(np.float32)
    consts = {"W": native.pack_panels(w), "B": rng.standard_normal(n).astype(np.float32),
              "gamma": rng.standard_normal(k).astype(np.float32), "beta": rng.standard_normal(k).astype(np.float32),
              "skip_bias": rng.standard_normal(k).astype(np.float32)}
    inits = [numpy_helper.from_array(v, name) for name, v in consts.items() if name in inputs]
    node = helper.make_node("PackedLinear", inputs, outputs, domain=native.DOMAIN, n=n, epsilon=eps)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in ("x", "skip")
                                            if i in inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])
    opts = ort.SessionOptions()
    native.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), w, consts


def _layer_norm(h, gamma, beta, eps):
    h = h.astype(np.float64)
    mean = h.mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + eps) * gamma + beta


@pytest.mark.parametrize("k,n", [(37, 17), (768, 50)])
def test_packed_linear_applies_the_residual_layer_norm_first(k, n):
    """With Gamma, PackedLinear is SkipLayerNormalization then the projection: H = X + Skip + SkipBias
    (second output), Y = LayerNorm(H) W + B; without Skip a plain LayerNorm; with one output, H stays inside."""
    rng = np.random.default_rng(8)
    sess, w, c = _fused_session(k, n, ["x", "W", "B", "skip", "gamma", "beta", "skip_bias"], ["y", "h"], eps=1e-5)
    for shape in [(1, 1, k), (2, 9, k)]:  # decode, a batch of prompts (rows in blocks and alone)
        x, skip = (rng.standard_normal(shape) * 3).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
        y, h = sess.run(None, {"x": x, "skip": skip})
        expected_h = x + skip + c["skip_bias"]
        np.testing.assert_allclose(h, expected_h, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y, _layer_norm(expected_h, c["gamma"], c["beta"], 1e-5) @ w + c["B"], rtol=1e-4, atol=1e-4)
    sess, w, c = _fused_session(k, n, ["x", "W", "", "", "gamma", "beta"], ["y"], eps=1e-3)  # LayerNorm alone, no bias
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], _layer_norm(x, c["gamma"], c["beta"], 1e-3) @ w,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="Skip must have X's shape"):
        _fused_session(k, n, ["x", "W", "B", "skip", "gamma", "beta"], ["y", "h"])[0].run(
            None, {"x": np.zeros((1, 2, k), np.float32), "skip": np.zeros((1, 3, k), np.float32)})
    with pytest.raises(Exception, match="a second output needs Gamma"):
        _fused_session(k, n, ["x", "W", "B"], ["y", "h"])[0].run(None, {"x": np.zeros((1, k), np.float32)})


def _screen_session(w, b, screen_shape=()):
    """PackedLinear over w (K, n) (+ b) with its Screen input (native/screen.c) fed by a graph input."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    inits = [numpy_helper.from_array(native.pack_panels(w), "W")]
    if b is not None:
        inits.append(numpy_helper.from_array(b, "B"))
    node = helper.make_node("PackedLinear", ["x", "W", "B" if b is not None else "", "", "", "", "", "screen"], ["y"],
                            domain=native.DOMAIN, n=n)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                            helper.make_tensor_value_info("screen", TensorProto.INT64, screen_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])
    opts = ort.SessionOptions()
    native.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_the_screen_keeps_the_full_products_argmax():
    """With Screen on, every row's argmax is the full product's (ties to the first, as numpy's), its panel
    holds the full product's very floats, and everything else lies below the row's largest value; the
    other panels are estimates (so the switch did something). Near ties that only fp32 can settle,
    an outlier feature, a bias, 1 to 5 rows, and columns so alike that screening gives up."""
    rng = np.random.default_rng(11)
    k, n = 96, 1000
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    w[:, 700] = w[:, 300] + np.float32(1e-7) * rng.standard_normal(k).astype(np.float32)  # near tie, panels apart
    w[:, 301] = w[:, 300]  # an exact tie in one panel: the first wins
    alike = np.repeat(w[:, :1], n, axis=1) + (rng.standard_normal((k, n)) * 1e-6).astype(np.float32)
    for weights, bias in ((w, None), (w, (rng.standard_normal(n) * 0.1).astype(np.float32)), (alike, None)):
        sess = _screen_session(weights, bias)
        for m in (1, 2, 3, 5):
            x = rng.standard_normal((m, 1, k)).astype(np.float32)
            x[0, 0, 5] = 60.0  # an outlier feature, as GPT-2's residual stream has
            x[-1] = weights[:, 300] / np.linalg.norm(weights[:, 300]) * 30  # pointed at the near tie
            full = sess.run(None, {"x": x, "screen": np.array(0, np.int64)})[0][:, 0]
            screened = sess.run(None, {"x": x, "screen": np.array(1, np.int64)})[0][:, 0]
            np.testing.assert_allclose(full, x[:, 0] @ weights + (0 if bias is None else bias), rtol=1e-4, atol=1e-4)
            assert (screened.argmax(axis=1) == full.argmax(axis=1)).all()
            for r, j in enumerate(full.argmax(axis=1)):
                panel = slice(j // 16 * 16, j // 16 * 16 + 16)
                assert np.array_equal(screened[r, panel], full[r, panel])
                assert (np.delete(screened[r], np.flatnonzero(screened[r] == full[r, j])) < full[r, j]).all()
            if weights is w:
                assert not np.array_equal(screened, full)  # estimates outside the candidates' panels
                assert full.argmax(axis=1)[-1] in (300, 700)  # the row pointed at the near tie
            else:
                assert np.array_equal(screened, full)  # every column a candidate: the full product


def test_the_screen_switch_is_one_scalar():
    sess = _screen_session(np.ones((8, 20), np.float32), None, screen_shape=None)
    with pytest.raises(Exception, match="Screen must be an int64 scalar, got rank 1"):
        sess.run(None, {"x": np.ones((1, 8), np.float32), "screen": np.array([1], np.int64)})


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_screen_kernel_keeps_the_argmax(isa):
    _with_isa("test_the_screen_keeps_the_full_products_argmax", isa)
