"""ai.edgelm.CachedAttention against ONNX Runtime's GroupQueryAttention: same inputs, same attributes,
the same outputs and the same cache rows, step after step, with the cache bound as both past and
present (appended in place) or passed in and returned (copied)."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.runtime import native

pytestmark = pytest.mark.skipif(native.library_path() is None, reason="edgelm's operator library is not built")

MASK = -1.0e9


def _session(op: str, heads: int, kv_heads: int, head_size: int, mask_input: bool = False, **attrs):
    """One attention node; ``mask_input``: CachedAttention takes the int64 attention mask in place of
    seqlens_k, total and the bias (the packed graphs' form)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = ["qkv", "past_key", "past_value", "seqlens_k", "total", "bias"]
    if mask_input:
        node = helper.make_node(op, ["qkv", "past_key", "past_value", "", "", "", "mask"],
                                ["y", "present_key", "present_value"], domain=native.DOMAIN,
                                num_heads=heads, kv_num_heads=kv_heads, **attrs)
    elif op == "GroupQueryAttention":
        node = helper.make_node(op, ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "", "", "", "bias"],
                                ["y", "present_key", "present_value"], domain="com.microsoft",
                                num_heads=heads, kv_num_heads=kv_heads, **attrs)
    else:
        node = helper.make_node(op, inputs, ["y", "present_key", "present_value"], domain=native.DOMAIN,
                                num_heads=heads, kv_num_heads=kv_heads, **attrs)
    values = [helper.make_tensor_value_info("qkv", f, None), helper.make_tensor_value_info("past_key", f, None),
              helper.make_tensor_value_info("past_value", f, None)]
    if mask_input:
        values.append(helper.make_tensor_value_info("mask", TensorProto.INT64, None))
    else:
        values += [helper.make_tensor_value_info("seqlens_k", i32, None), helper.make_tensor_value_info("total", i32, []),
                   helper.make_tensor_value_info("bias", f, None)]
    graph = helper.make_graph([node], "g", values,
                              [helper.make_tensor_value_info(n, f, None) for n in ("y", "present_key", "present_value")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(native.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    native.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _schedule(seed: int, batch: int, steps: list[int], width: int):
    """Per step: (qkv, mask over all tokens so far); row 1 and beyond are left-padded by 3 tokens."""
    rng = np.random.default_rng(seed)
    total, out = 0, []
    for s in steps:
        total += s
        mask = np.ones((batch, total), np.float32)
        mask[1:, :3] = 0
        out.append((rng.standard_normal((batch, s, width)).astype(np.float32), mask))
    return out


def _feeds(sess, qkv, mask):
    """The step's inputs in the session's form: seqlens_k, total and the bias, or the int64 mask."""
    batch, s, _ = qkv.shape
    if "mask" in {i.name for i in sess.get_inputs()}:
        return {"qkv": qkv, "mask": mask.astype(np.int64)}
    total = mask.shape[1]
    bias = np.broadcast_to(((1 - mask) * MASK)[:, None, None, :], (batch, 1, s, total)).copy()
    return {"qkv": qkv, "seqlens_k": np.full(batch, total - 1, np.int32), "total": np.array(total, np.int32), "bias": bias}


def _run_bound(sess, schedule, shape):
    """The cache as one buffer bound to past and present; yields (y, keys, values) after each step."""
    import onnxruntime as ort

    keys, values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    kv, vv = ort.OrtValue.ortvalue_from_numpy(keys), ort.OrtValue.ortvalue_from_numpy(values)
    for qkv, mask in schedule:
        binding = sess.io_binding()
        binding.bind_output("y", "cpu")  # bound first: output 0
        for name, value in _feeds(sess, qkv, mask).items():
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_input("past_key", kv)
        binding.bind_ortvalue_input("past_value", vv)
        binding.bind_ortvalue_output("present_key", kv)
        binding.bind_ortvalue_output("present_value", vv)
        sess.run_with_iobinding(binding)
        yield binding.copy_outputs_to_cpu()[0], keys.copy(), values.copy()


def _run_copied(sess, schedule, shape):
    """past of exactly the tokens so far; present returned (the full cache only)."""
    keys = np.zeros(shape[:2] + (0,) + shape[3:], np.float32)
    values = keys
    for qkv, mask in schedule:
        y, keys, values = sess.run(None, {**_feeds(sess, qkv, mask), "past_key": keys, "past_value": values})
        yield y, keys, values


def _reference(schedule, heads, kv_heads, head_size, scale, window):
    """numpy attention over every token so far (causal, window, bias): the output of each step."""
    keys, values, outs = None, None, []
    for qkv, mask in schedule:
        batch, s, _ = qkv.shape
        q = qkv[..., :heads * head_size].reshape(batch, s, heads, head_size)
        k = qkv[..., heads * head_size:(heads + kv_heads) * head_size].reshape(batch, s, kv_heads, head_size)
        v = qkv[..., (heads + kv_heads) * head_size:].reshape(batch, s, kv_heads, head_size)
        keys = k if keys is None else np.concatenate([keys, k], axis=1)
        values = v if values is None else np.concatenate([values, v], axis=1)
        total = keys.shape[1]
        rep = heads // kv_heads
        kk, vv = np.repeat(keys, rep, axis=2).astype(np.float64), np.repeat(values, rep, axis=2).astype(np.float64)
        scores = scale * np.einsum("bshd,bthd->bhst", q.astype(np.float64), kk)
        qpos = np.arange(total - s, total)[:, None]
        kpos = np.arange(total)[None, :]
        allowed = (kpos <= qpos) & ((qpos - kpos < window) if window > 0 else True)
        scores = scores + np.where(allowed, 0.0, -np.inf) + ((1 - mask) * MASK)[:, None, None, :]
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        outs.append(np.einsum("bhst,bthd->bshd", p, vv).reshape(batch, s, heads * head_size))
    return outs


def _resident(total, capacity, window):
    return native.kernels().edgelm_resident_rows(total, capacity, window)


CASES = [  # heads, kv heads, head size, window, sliding, capacity, steps
    (4, 4, 16, 0, 0, 40, [7, 1, 1, 1, 3, 1]),          # GPT-2: full cache, a multi-token step after the prompt
    (4, 2, 24, 0, 0, 32, [5, 1, 1, 2]),                 # shared KV heads, head size not a multiple of 16
    (3, 3, 16, 4, 0, 30, [6, 1, 1, 1, 1, 1, 1]),        # a window over a full cache
    (2, 2, 16, 4, 1, 6, [3] + [1] * 12),                # GPT-Neo's local layers: compactions while decoding
    (2, 2, 16, 4, 1, 6, [9] + [1] * 5),                 # a prompt longer than the cache
    (2, 1, 32, 5, 1, 7, [2, 3, 1, 4, 1, 1, 1]),         # several tokens per step across compactions
]


@pytest.mark.parametrize("mask_input", [False, True], ids=["bias", "mask"])
@pytest.mark.parametrize("heads,kv_heads,h,window,sliding,capacity,steps", CASES)
def test_matches_group_query_attention_in_place(heads, kv_heads, h, window, sliding, capacity, steps, mask_input):
    attrs = dict(scale=0.3)
    if window:
        attrs["local_window_size"] = window
    if sliding:
        attrs["sliding_window_cache"] = 1
    # GroupQueryAttention takes several new tokens over a past for batch 1 only; the numpy reference
    # checks edgelm's operator on a left-padded batch of 2 in those cases too
    many = any(s > 1 for s in steps[1:])
    batch = 2
    schedule = _schedule(7, batch, steps, (heads + 2 * kv_heads) * h)
    shape = (batch, kv_heads, capacity, h)
    ours = _run_bound(_session("CachedAttention", heads, kv_heads, h, mask_input, **attrs), schedule, shape)
    gqa_schedule = [(qkv[:1], mask[:1]) for qkv, mask in schedule] if many else schedule
    theirs = _run_bound(_session("GroupQueryAttention", heads, kv_heads, h, **attrs), gqa_schedule,
                        (len(gqa_schedule[0][0]),) + shape[1:])
    reference = _reference(schedule, heads, kv_heads, h, 0.3, window)
    total = 0
    for step, ((y, k, v), (gy, gk, gv), ry) in enumerate(zip(ours, theirs, reference)):
        total += steps[step]
        live = slice(max(0, 3 - (total - steps[step])), None)  # row 1's queries past its 3 padded tokens
        np.testing.assert_allclose(y[0], ry[0], rtol=1e-4, atol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(y[1, live], ry[1, live], rtol=1e-4, atol=1e-5, err_msg=f"step {step}")
        n = len(gy)
        np.testing.assert_allclose(y[:n], gy, rtol=1e-4, atol=1e-5, err_msg=f"step {step}")
        rows = _resident(total, capacity, window) if sliding else total
        np.testing.assert_array_equal(k[:n, :, :rows], gk[:, :, :rows], err_msg=f"step {step}")
        np.testing.assert_array_equal(v[:n, :, :rows], gv[:, :, :rows], err_msg=f"step {step}")


@pytest.mark.parametrize("h", [6, 20])
def test_head_sizes_off_the_vector_width_match_the_reference(h):
    """Head size 6 takes the scalar loops, 20 the 4-lane ones (AVX2 wants multiples of 8); against numpy
    only, as GroupQueryAttention wants multiples of 8."""
    heads, kv_heads, steps = 2, 1, [9, 1, 1, 2, 1]
    schedule = _schedule(11, 2, steps, (heads + 2 * kv_heads) * h)
    ours = _run_bound(_session("CachedAttention", heads, kv_heads, h, scale=0.3), schedule, (2, kv_heads, 20, h))
    total = 0
    for step, ((y, _, _), ry) in enumerate(zip(ours, _reference(schedule, heads, kv_heads, h, 0.3, 0))):
        total += steps[step]
        live = slice(max(0, 3 - (total - steps[step])), None)
        np.testing.assert_allclose(y[0], ry[0], rtol=1e-4, atol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(y[1, live], ry[1, live], rtol=1e-4, atol=1e-5, err_msg=f"step {step}")


def test_portable_loops_pass_these_tests():
    """The portable loops (what ARM CPUs run; EDGELM_KERNEL_ISA=generic picks them here) in a fresh process."""
    import os
    import subprocess
    import sys

    if os.environ.get("EDGELM_KERNEL_ISA") == "generic":
        pytest.skip("already running the portable loops")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env={**os.environ, "EDGELM_KERNEL_ISA": "generic"}, capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_copied_cache_matches_group_query_attention():
    heads, kv_heads, h = 4, 2, 16
    schedule = _schedule(8, 2, [6, 1, 1, 1], (heads + 2 * kv_heads) * h)
    shape = (2, kv_heads, 0, h)
    ours = _run_copied(_session("CachedAttention", heads, kv_heads, h), schedule, shape)
    theirs = _run_copied(_session("GroupQueryAttention", heads, kv_heads, h), schedule, shape)
    for (y, k, v), (gy, gk, gv) in zip(ours, theirs):
        assert k.shape == gk.shape
        np.testing.assert_allclose(y, gy, rtol=1e-4, atol=1e-5)  # default scale 1 / sqrt(H) on both
        np.testing.assert_array_equal(k, gk)
        np.testing.assert_array_equal(v, gv)


def test_sliding_cache_copied_equals_in_place():
    heads, h, window, capacity = 2, 16, 4, 6
    attrs = dict(local_window_size=window, sliding_window_cache=1)
    schedule = _schedule(9, 2, [3] + [1] * 8, 3 * heads * h)
    sess = _session("CachedAttention", heads, heads, h, **attrs)
    bound = list(_run_bound(sess, schedule, (2, heads, capacity, h)))
    keys = values = np.zeros((2, heads, capacity, h), np.float32)
    total = 0
    for (qkv, mask), (y, k, v) in zip(schedule, bound):
        total += qkv.shape[1]
        cy, keys, values = sess.run(None, {**_feeds(sess, qkv, mask), "past_key": keys, "past_value": values})
        rows = _resident(total, capacity, window)
        np.testing.assert_array_equal(cy, y)
        np.testing.assert_array_equal(keys[:, :, :rows], k[:, :, :rows])
        np.testing.assert_array_equal(values[:, :, :rows], v[:, :, :rows])


def test_rejects_inputs_that_break_the_contract():
    sess = _session("CachedAttention", 2, 2, 16)
    qkv = np.zeros((1, 1, 96), np.float32)
    feeds = _feeds(sess, qkv, np.ones((1, 5), np.float32))
    with pytest.raises(Exception, match="past holds 2 rows, fewer than the 4 tokens"):
        short = np.zeros((1, 2, 2, 16), np.float32)
        sess.run(None, {**feeds, "past_key": short, "past_value": short})
    past = np.zeros((1, 2, 4, 16), np.float32)
    with pytest.raises(Exception, match=r"seqlens_k\[0\] is 2"):
        sess.run(None, {**feeds, "seqlens_k": np.array([2], np.int32), "past_key": past, "past_value": past})
    with pytest.raises(Exception, match="do not fit 2 heads"):
        sess.run(None, {**feeds, "qkv": np.zeros((1, 1, 95), np.float32), "past_key": past, "past_value": past})
    with pytest.raises(Exception, match="sliding_window_cache needs local_window_size"):
        _session("CachedAttention", 2, 2, 16, sliding_window_cache=1)


def test_the_mask_form_rejects_what_does_not_fit():
    sess = _session("CachedAttention", 2, 2, 16, mask_input=True)
    past = np.zeros((2, 2, 8, 16), np.float32)
    qkv = np.zeros((2, 1, 96), np.float32)
    with pytest.raises(Exception, match=r"attention_mask must be \(B, T\) with B = 2"):
        sess.run(None, {"qkv": qkv, "mask": np.ones((1, 4), np.int64), "past_key": past, "past_value": past})
    with pytest.raises(Exception, match="3 tokens in total are below the 4 new tokens"):
        sess.run(None, {"qkv": np.zeros((2, 4, 96), np.float32), "mask": np.ones((2, 3), np.int64),
                        "past_key": past, "past_value": past})


def test_packed_embedding_gathers_the_table_rows():
    """ai.edgelm.PackedEmbedding: row v of a (V, D) table from its packed transpose, the tied LM head's panels."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    vocab, d = 37, 12  # 3 panels, the last one padded
    table = np.random.default_rng(3).standard_normal((vocab, d)).astype(np.float32)
    node = helper.make_node("PackedEmbedding", ["ids", "w"], ["y"], domain=native.DOMAIN, n=vocab)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("w", TensorProto.FLOAT, (3, d, 16), native.pack_panels(table.T).ravel())])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(native.DOMAIN, 1)])
    opts = ort.SessionOptions()
    native.register(opts)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ids = np.array([[0, 15, 16, 36], [35, 1, 17, 31]], np.int64)
    np.testing.assert_array_equal(sess.run(None, {"ids": ids})[0], table[ids])
    assert sess.run(None, {"ids": np.zeros((1, 0), np.int64)})[0].shape == (1, 0, d)
    with pytest.raises(Exception, match=r"token id 37 is outside \[0, 37\)"):
        sess.run(None, {"ids": np.array([[2, 37]], np.int64)})
