"""Structurally pruned models (heads and MLP width per layer): load, export, generate, evaluate, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgelm.errors import InputError, UnsupportedModelError
from edgelm.export import export_model, resolve
from edgelm.export.embedded import ASSETS
from edgelm.export.torch_model import apply_layer_shapes, load_torch_model
from edgelm.optimize.evaluate import prompt_feed
from edgelm.runtime import Generator, SamplingConfig
from fixtures import TINY_CONFIGS, make_pruned_tiny_model

ARCHS = sorted(TINY_CONFIGS)
# Three heads of 16 in the unpruned config, so that the two layers really differ: 2 heads and 1.
# Weights of std 0.3 (Hugging Face's default 0.02 makes a tiny model repeat one token), so greedy
# parity compares varied tokens.
WIDE = {"gpt2": dict(n_head=3, n_embd=48, initializer_range=0.3),
        "gpt_neo": dict(num_heads=3, hidden_size=48, initializer_range=0.3)}
HEADS, INNER = (2, 1), (100, 37)
PROMPTS = ["It was a truth universally acknowledged, that", "Emma Woodhouse, handsome,"]
TEXT = (ASSETS / "text" / "heldout.txt").read_text()[:3000]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """{arch: (model folder, artifact folder, manifest)}, exported once for the module."""
    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for arch in ARCHS:
        src = make_pruned_tiny_model(arch, root / arch, HEADS, INNER, seed=1, **WIDE[arch])
        art = root / f"{arch}-onnx"
        out[arch] = (src, art, export_model(str(src), art, progress=False))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_folder_loads_and_runs_in_pytorch(pruned, arch):
    import torch

    model = load_torch_model(pruned[arch][0])
    with torch.inference_mode():
        out = model(input_ids=torch.arange(1, 8)[None], use_cache=True)
    assert out.logits.shape == (1, 7, 50257) and torch.isfinite(out.logits).all()
    assert [tuple(layer.keys.shape) for layer in out.past_key_values.layers] == [(1, 2, 7, 16), (1, 1, 7, 16)]
    facts = resolve(json.loads((pruned[arch][0] / "config.json").read_text()))
    assert (facts.num_heads, facts.head_size, facts.layer_heads, facts.layer_inner) == (3, 16, HEADS, INNER)


def test_apply_layer_shapes_keeps_projections_that_already_fit():
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**{**TINY_CONFIGS["gpt2"], **WIDE["gpt2"]})
    model = transformers.GPT2LMHeadModel(config)
    kept = model.transformer.h[0].attn.c_attn
    apply_layer_shapes(model, [3, 1], [192, 37])  # layer 0: unpruned attention and MLP (4 x 48)
    h0, h1 = model.transformer.h
    assert h0.attn.c_attn is kept and h0.mlp.c_fc.weight.shape == (48, 192)
    assert h1.attn.c_attn.weight.shape == (48, 48) and (h1.attn.num_heads, h1.attn.split_size) == (1, 16)
    assert h1.mlp.c_proj.weight.shape == (37, 48) and not h1.mlp.c_fc.weight.is_meta
    std = float(h1.attn.c_attn.weight.detach().std())
    assert 0.5 < std / config.initializer_range < 1.5  # initialised as Hugging Face initialises the model
    with torch.inference_mode():
        assert model(input_ids=torch.arange(5)[None]).logits.shape == (1, 5, 50257)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_validates_with_a_cache_shape_per_layer(pruned, arch):
    _, art, m = pruned[arch]
    assert m["validation"]["status"] == "passed"
    facts = m["model"]["facts"]
    assert facts["layer_heads"] == list(HEADS) and facts["layer_inner"] == list(INNER) and facts["num_heads"] == 3
    assert [(e["heads"], e["head_size"]) for e in m["io"]["kv_cache"]] == [(2, 16), (1, 16)]
    past = {i["name"]: i["shape"] for i in m["io"]["inputs"]}
    assert past["past_key_values.0.key"][1] == 2 and past["past_key_values.1.value"][1] == 1
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    attn = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert [(a["num_heads"], a["kv_num_heads"]) for a in attn] == [(2, 2), (1, 1)]
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in graph.output}
    assert dims["present.0.key"][1] == 2 and dims["present.1.key"][1] == 1


def _hf_greedy(model_dir, prompts, new_tokens):
    """transformers' generate on the model load_torch_model builds (from_pretrained cannot load pruned shapes)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = load_torch_model(model_dir)
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_past_the_local_window(pruned, arch):
    # 24 new tokens on a left-padded batch: the tiny GPT-Neo's window is 4, its local layer evicts
    src, art, _ = pruned[arch]
    gen = Generator.load(art)
    ours = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=24, stop_at_eos=False))
    assert [r.token_ids for r in ours] == _hf_greedy(src, PROMPTS, 24)
    assert all(len(set(r.token_ids)) > 8 for r in ours)  # not one token repeated
    assert [gen.last_cache._host[k].shape[1] for k in (0, 1, 2, 3)] == [2, 2, 1, 1]  # key, value per layer


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_layout_on_pruned_widths(pruned, arch, tmp_path):
    """MLP widths 100 and 37 and 1-2 heads: panels with ragged tails, validated and token-identical."""
    from edgelm.runtime import native

    if native.library_path() is None:
        pytest.skip("edgelm's operator library is not built")
    src = pruned[arch][0]
    m = export_model(str(src), tmp_path / "packed", progress=False, linear_layout="packed")
    assert m["validation"]["status"] == "passed" and m["graph"]["operators"]["PackedLinear"] == 4 * 2 + 1
    ours = Generator.load(tmp_path / "packed").generate(PROMPTS, SamplingConfig(max_new_tokens=24, stop_at_eos=False))
    assert [r.token_ids for r in ours] == _hf_greedy(src, PROMPTS, 24)


def _int4_weight(graph, node) -> np.ndarray:
    """The [K, N] float weight a 4-bit MatMulNBits node computes with, unpacked from its initializers."""
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    attrs = {a.name: a.i for a in node.attribute}
    k, block = attrs["K"], attrs["block_size"]
    packed, scales, zeros = (init[name] for name in node.input[1:4])
    n, blocks = scales.reshape(attrs["N"], -1).shape
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, blocks, block)  # low nibble first
    zero = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    w = (codes.astype(np.float32) - zero[..., None]) * scales.reshape(n, blocks)[..., None]
    return w.reshape(n, -1)[:, :k].T


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_on_pruned_widths(pruned, arch, tmp_path, capsys):
    """Blocks of 16 over MLP widths 100 and 37 and heads of 16: each MatMulNBits of the int4 artifact,
    ragged last blocks included, computes x @ its own dequantized weight, and the model generates."""
    pytest.importorskip("onnxruntime.quantization")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgelm.cli import main

    _, art, _ = pruned[arch]
    out = tmp_path / "q4"
    rc = main(["optimize", "quantize", str(art), "-o", str(out), "--mode", "int4-weight", "--block-size", "16",
               "--max-length", "48", "--stride", "24", "--max-ppl-increase", "25%", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    model = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 4 * 2 + 1
    ks = set()
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 16
        ks.add(attrs["K"])
        single = helper.make_graph(
            [helper.make_node("MatMulNBits", ["x", *node.input[1:]], ["y"], domain="com.microsoft",
                              **{k: v for k, v in attrs.items() if k != "accuracy_level"})], "one",  # fp32 compute
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [t for t in model.graph.initializer if t.name in node.input[1:]])
        sess = ort.InferenceSession(helper.make_model(single, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                    helper.make_opsetid("com.microsoft", 1)]).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        x = np.random.default_rng(attrs["K"]).standard_normal((3, attrs["K"])).astype(np.float32)
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ _int4_weight(model.graph, node), rtol=1e-4, atol=1e-4)
    assert {100, 37} <= ks  # the MLP's second projections read the pruned widths
    result = Generator.load(out).generate(PROMPTS[0], SamplingConfig(max_new_tokens=8, stop_at_eos=False))
    assert len(result.token_ids) == 8


INT8_OPS = {"int8-weight": "MatMulNBits", "int8-dynamic": "MatMulInteger", "int8-static": "QuantizeLinear"}


@pytest.mark.parametrize("mode", sorted(INT8_OPS))
@pytest.mark.parametrize("arch", ARCHS)
def test_int8_modes_on_pruned_widths(pruned, arch, mode, tmp_path, capsys):
    """Each int8 mode on MLP widths 100 and 37 and 1-2 heads: every projection and the head quantized
    (one quantized operator each), logits within int8's error of the fp32 artifact's, and it generates."""
    pytest.importorskip("onnxruntime.quantization")
    import onnxruntime as ort

    from edgelm.cli import main

    _, art, manifest = pruned[arch]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / mode
    own = {"int8-weight": ["--block-size", "16"],  # the settings of this mode alone (others are refused)
           "int8-static": ["--calib-text", str(text), "--calib-windows", "4", "--calib-length", "48"]}.get(mode, [])
    rc = main(["optimize", "quantize", str(art), "-o", str(out), "--mode", mode, *own,
               "--eval-text", str(text),
               "--max-length", "48", "--stride", "24", "--max-ppl-increase", "25%", "--new-tokens", "8",
               "--repeats", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count(INT8_OPS[mode]) == 4 * 2 + 1
    feeds = prompt_feed(manifest, np.array([[464, 3290, 286, 262, 1748, 373]], np.int64))
    ref, got = (ort.InferenceSession(str(a / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
                for a in (art, out))
    cosine = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cosine.min() > 0.99, cosine  # a wrong width or scale would leave nothing of the logits
    assert np.abs(got - ref).max() > 0  # and they are quantized, not the fp32 weights
    result = Generator.load(out).generate(PROMPTS[0], SamplingConfig(max_new_tokens=8, stop_at_eos=False))
    assert len(result.token_ids) == 8


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_and_pytorch_perplexity_agree(pruned, arch):
    from edgelm.optimize.evaluate import onnx_perplexity, torch_perplexity

    src, art, _ = pruned[arch]
    a = onnx_perplexity(art, TEXT, stride=24, max_length=48)
    b = torch_perplexity(src, TEXT, stride=24, max_length=48)
    assert a.tokens == b.tokens and a.windows == b.windows
    assert abs(a.perplexity - b.perplexity) / b.perplexity < 1e-4


@pytest.mark.parametrize("field,value,expected", [
    ("edgelm_layer_heads", [2], "lists 1 values for 2 layers"),
    ("edgelm_layer_inner", [100, 37, 5], "lists 3 values for 2 layers"),
    ("edgelm_layer_heads", [2, 0], "gives layer 1 the attention head count 0"),
    ("edgelm_layer_inner", [100, -1], "gives layer 1 the MLP width -1"),
    ("edgelm_layer_heads", 2, "is 2, not a list"),
])
def test_bad_layer_shapes_are_one_sentence(field, value, expected):
    cfg = {**TINY_CONFIGS["gpt2"], field: value}
    with pytest.raises(UnsupportedModelError, match=expected) as err:
        resolve(cfg)
    assert "\n" not in str(err.value) and field in str(err.value)


def test_config_that_does_not_match_the_weights_is_refused(pruned, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(pruned["gpt2"][0], src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["edgelm_layer_heads"]  # weights pruned, config says 3 heads everywhere
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="layer 0's attention QKV weight is .* edgelm_layer_heads"):
        export_model(str(src), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="config.json implies .* edgelm_layer_heads"):
        load_torch_model(src)


def test_cli_error_is_one_line(pruned, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(pruned["gpt_neo"][0], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["edgelm_layer_heads"] = [2, 0]
    (src / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "edgelm", "export", str(src), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "edgelm_layer_heads" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_optimum_backend_refuses_a_pruned_model_in_one_sentence(pruned, tmp_path, capsys):
    """Optimum's exporter builds every layer from config.json's one head count: it cannot load a pruned model."""
    pytest.importorskip("optimum.exporters.onnx")
    from edgelm.cli import main

    rc = main(["export", str(pruned["gpt2"][0]), "-o", str(tmp_path / "o"), "--backend", "optimum"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "pruned (heads per layer [2, 1]" in err and "--backend builder" in err
    assert not (tmp_path / "o").exists()


def test_runtime_reads_manifests_without_per_layer_heads(pruned):
    """Artifacts written before kv_cache entries had "heads": one count (facts num_heads) for every layer."""
    manifest = json.loads(json.dumps(pruned["gpt2"][2]))
    for e in manifest["io"]["kv_cache"]:
        del e["heads"], e["head_size"]
    feed = prompt_feed(manifest, np.arange(4)[None])
    assert feed["past_key_values.1.key"].shape == (1, 3, 0, 16)
    manifest["io"]["kv_cache"][1]["heads"] = 1
    assert prompt_feed(manifest, np.arange(4)[None])["past_key_values.1.key"].shape == (1, 1, 0, 16)
