"""The optimum backend: its artifact validates, its manifest is honest, FIELD_NOTES' facts hold in its graph."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import onnx
import pytest

pytest.importorskip("optimum.exporters.onnx")

from edgelm.errors import DependencyError  # noqa: E402
from edgelm.export import export_model  # noqa: E402
from edgelm.export import optimum_backend  # noqa: E402
from edgelm.export.builder import count_ops  # noqa: E402
from edgelm.manifest import read_manifest  # noqa: E402
from fixtures import TINY_CONFIGS  # noqa: E402

ARCHS = sorted(TINY_CONFIGS)


@pytest.fixture(scope="module")
def optimum_artifact(tiny_model_dir, tmp_path_factory):
    """{arch: artifact folder} exported in fp32 with the optimum backend, once per module."""
    root = tmp_path_factory.mktemp("optimum_artifacts")
    for arch, d in tiny_model_dir.items():
        export_model(str(d), root / arch, backend="optimum", progress=False)
    assert sorted(p.name for p in root.iterdir()) == ARCHS  # no scratch folder left beside them
    return {arch: root / arch for arch in tiny_model_dir}


@pytest.mark.parametrize("arch", ARCHS)
def test_optimum_artifact_validates_and_describes_itself(optimum_artifact, arch):
    import onnxruntime as ort

    folder = optimum_artifact[arch]
    m = read_manifest(folder, verify_checksums=True)
    assert m["graph"]["backend"] == "optimum" and m["steps"][0]["backend"] == "optimum"
    assert m["graph"]["external_data"] is None and m["graph"]["opset"].get("ai.onnx", 0) >= 14
    assert sorted(p.name for p in folder.iterdir() if "onnx" in p.name) == ["model.onnx"]
    assert not (folder / "config.json").exists()  # optimum's copies of the model folder are not kept

    layers = m["model"]["facts"]["num_layers"]
    cache = m["io"]["kv_cache"]
    assert [c["kind"] for c in cache] == ["concat"] * layers
    assert [c["window"] for c in cache] == ([None, None] if arch == "gpt2" else [None, 4])
    assert not any(c["share_buffer"] for c in cache) and m["io"]["kv_dtype"] == "float32"
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [i["name"] for i in m["io"]["inputs"]]
    assert [o.name for o in sess.get_outputs()] == [o["name"] for o in m["io"]["outputs"]]
    names = {i["name"] for i in m["io"]["inputs"]} | {o["name"] for o in m["io"]["outputs"]}
    assert all({c["past_key"], c["past_value"], c["present_key"], c["present_value"]} <= names for c in cache)

    v = m["validation"]
    assert v["status"] == "passed"
    assert set(v["max_abs_diff"]) == {"logits"} | {f"present.{i}.{p}" for i in range(layers) for p in ("key", "value")}
    assert all(0 <= d <= v["atol"] for d in v["max_abs_diff"].values())
    if arch == "gpt_neo":
        assert v["schedule"]["total_tokens"] > 4  # beyond the local window


@pytest.mark.parametrize("arch", ARCHS)
def test_optimum_graph_has_no_fused_attention(optimum_artifact, tiny_artifact, arch):
    """FIELD_NOTES: optimum's graph keeps attention as plain ops (one Softmax per layer), no GQA."""
    m = read_manifest(optimum_artifact[arch])
    ops = m["graph"]["operators"]
    layers = m["model"]["facts"]["num_layers"]
    assert ops == count_ops(optimum_artifact[arch] / "model.onnx")
    assert not {"GroupQueryAttention", "MultiHeadAttention", "Attention"} & set(ops)
    assert ops["Softmax"] == layers and ops["LayerNormalization"] == 2 * layers + 1
    if arch == "gpt2":
        assert ops["Gemm"] == 4 * layers  # Conv1D becomes Gemm: no constant MatMul weight for the quantizer
    builder_ops = read_manifest(tiny_artifact[arch])["graph"]["operators"]
    assert builder_ops["GroupQueryAttention"] == layers
    assert sum(builder_ops.values()) < sum(ops.values())

    graph = onnx.load(str(optimum_artifact[arch] / "model.onnx"), load_external_data=False).graph
    f = m["model"]["facts"]
    sizes = [int(np.prod(t.dims)) for t in graph.initializer]
    embeddings = sizes.count(f["vocab_size"] * f["hidden_size"])
    if importlib.util.find_spec("accelerate") is None:
        assert embeddings == 2  # without accelerate the tied wte / lm_head weight is stored twice
    assert m["graph"]["weight_bytes"] == sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer)


def test_ort_optimizer_fuses_no_attention_in_optimum_gpt2(optimum_artifact):
    """FIELD_NOTES: ONNX Runtime's transformer optimizer fuses SkipLayerNorm and FastGelu, no attention."""
    from onnxruntime.transformers.optimizer import optimize_model

    f = read_manifest(optimum_artifact["gpt2"])["model"]["facts"]
    opt = optimize_model(str(optimum_artifact["gpt2"] / "model.onnx"), model_type="gpt2",
                         num_heads=f["num_heads"], hidden_size=f["hidden_size"], opt_level=0)
    stats = opt.get_fused_operator_statistics()
    assert stats["Attention"] == 0 and stats["MultiHeadAttention"] == 0
    assert stats["SkipLayerNormalization"] > 0 and stats["FastGelu"] == f["num_layers"]


def test_large_weights_go_to_one_external_file(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(optimum_backend, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "ext"
    m = export_model(str(tiny_model_dir["gpt2"]), out, backend="optimum", progress=False)
    assert m["graph"]["external_data"] == "model.onnx.data"
    assert sorted(p.name for p in out.iterdir() if "onnx" in p.name) == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx").stat().st_size < 1_000_000 and m["validation"]["status"] == "passed"
    assert [p.name for p in tmp_path.iterdir()] == ["ext"]


def test_loose_external_files_are_gathered_into_one(tmp_path):
    """Optimum writes one file per tensor for models beyond 2 GB; the artifact gets one data file."""
    from onnx import TensorProto, helper, numpy_helper

    weights = [np.full((64, 64), k, np.float32) for k in range(3)]
    nodes, x = [], "x"
    for k in range(3):
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"y{k}"]))
        x = f"y{k}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(w, f"w{k}") for k, w in enumerate(weights)])
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir(), out.mkdir()
    onnx.save_model(helper.make_model(graph, ir_version=10), str(scratch / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(scratch.iterdir())) == 4
    assert optimum_backend._place(scratch / "model.onnx", out) == "model.onnx.data"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    back = onnx.load(str(out / "model.onnx"))
    assert all(np.array_equal(numpy_helper.to_array(t), w) for t, w in zip(back.graph.initializer, weights))


def test_fp16_without_cuda_is_one_clear_sentence(tiny_model_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: optimum's fp16 export is allowed here")
    out = tmp_path / "h"
    r = subprocess.run([sys.executable, "-m", "edgelm", "export", str(tiny_model_dir["gpt2"]), "-o", str(out),
                        "--backend", "optimum", "--dtype", "fp16"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgelm export: error: "), r.stderr
    assert "CUDA" in lines[0] and "--backend builder" in lines[0]
    assert not out.exists() and not any(tmp_path.iterdir())


def test_missing_optimum_names_the_extra(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # import now raises ImportError
    with pytest.raises(DependencyError, match=r"edgelm\[optimum\]"):
        export_model(str(tiny_model_dir["gpt2"]), tmp_path / "o", backend="optimum", progress=False)
    assert not any(tmp_path.iterdir())
