"""The CUDA path. These tests run only where onnxruntime-gpu and an NVIDIA GPU are present;
everywhere else they are skipped (and the README says the CUDA path is unverified)."""

from __future__ import annotations

import pytest

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="no CUDA provider (needs onnxruntime-gpu and an NVIDIA GPU)")


@pytest.fixture(scope="module")
def fp16_gpt2(tiny_model_dir, tmp_path_factory):
    from edgelm.export import export_model

    out = tmp_path_factory.mktemp("cuda") / "gpt2-fp16"
    export_model(str(tiny_model_dir["gpt2"]), out, dtype="fp16", progress=False)
    return out


def test_cuda_greedy_matches_cpu(fp16_gpt2, tiny_artifact):
    from edgelm.runtime import Generator, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=16, stop_at_eos=False)
    gpu = Generator.load(fp16_gpt2, provider="cuda").generate("Emma said", cfg)
    cpu = Generator.load(fp16_gpt2, provider="cpu").generate("Emma said", cfg)
    assert gpu.token_ids == cpu.token_ids


def test_cuda_cache_stays_on_the_device(fp16_gpt2):
    from edgelm.runtime import Generator, SamplingConfig

    gen = Generator.load(fp16_gpt2, provider="cuda")
    gen.generate("Emma said", SamplingConfig(max_new_tokens=8, stop_at_eos=False))
    values = gen.last_cache.values.values()
    assert all(v.device_name().lower() == "cuda" for v in values)
