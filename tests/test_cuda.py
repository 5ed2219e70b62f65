"""The CUDA path. These tests run only where ONNX Runtime's CUDA provider starts (onnxruntime-gpu,
an NVIDIA GPU and the CUDA libraries); everywhere else they are skipped, unless EDGELM_REQUIRE_CUDA=1
(scripts/cuda_check.sh sets it on the GPU machine), which makes a provider that does not start fail."""

from __future__ import annotations

import os

import pytest

ort = pytest.importorskip("onnxruntime")


def _why_cuda_does_not_start() -> str | None:
    """None when a CUDA session starts on a one-node graph; else the reason."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "no CUDA provider in this ONNX Runtime (needs onnxruntime-gpu)"
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    from edgelm.errors import DependencyError
    from edgelm.runtime.artifact import _open

    try:
        _open(ort, model.SerializeToString(), ort.SessionOptions(), "CUDAExecutionProvider")
    except DependencyError as exc:
        return str(exc)
    return None


WHY_NOT = _why_cuda_does_not_start()
if WHY_NOT and os.environ.get("EDGELM_REQUIRE_CUDA") == "1":
    raise RuntimeError(f"EDGELM_REQUIRE_CUDA=1, but {WHY_NOT}")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

PROMPTS = ["Emma said", "It is a truth universally acknowledged that a single man"]


@pytest.fixture(scope="module")
def fp16_artifact(tiny_model_dir, tmp_path_factory):
    """{arch: fp16 artifact}: fp16 attention without a padding bias (right padding), as CUDA needs."""
    from edgelm.export import export_model

    root = tmp_path_factory.mktemp("cuda")
    return {arch: export_model(str(d), root / arch, dtype="fp16", progress=False) and root / arch
            for arch, d in tiny_model_dir.items()}


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_cuda_greedy_matches_cpu(fp16_artifact, arch):
    """One prompt past the tiny GPT-Neo's window, and a batch of prompts of different lengths (each
    prefilled on its own into its row of the device cache, then decoded together)."""
    from edgelm.runtime import Generator, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=16, stop_at_eos=False)
    gpu, cpu = (Generator.load(fp16_artifact[arch], provider=p) for p in ("cuda", "cpu"))
    assert gpu.generate(PROMPTS[0], cfg).token_ids == cpu.generate(PROMPTS[0], cfg).token_ids
    assert [r.token_ids for r in gpu.generate(PROMPTS, cfg)] == [r.token_ids for r in cpu.generate(PROMPTS, cfg)]


def test_cuda_cache_stays_on_the_device(fp16_artifact):
    from edgelm.runtime import Generator, SamplingConfig

    gen = Generator.load(fp16_artifact["gpt_neo"], provider="cuda")
    addresses = []
    for _ in gen.run(gen._rows(PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False))):
        addresses.append(gen.last_cache.buffer_addresses())
    assert all(a == addresses[0] for a in addresses)  # the same device buffers at every step
    assert all(v.device_name().lower() == "cuda" for v in gen.last_cache.values.values())
