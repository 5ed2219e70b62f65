"""Runtime: parity with transformers' generate, sampling, batching, buffers, errors, lean imports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgelm.errors import DependencyError, InputError
from edgelm.export.embedded import EMBEDDED_MODELS
from edgelm.runtime import Generator, SamplingConfig
from edgelm.runtime.sampling import next_tokens

PROMPTS = ["It was a truth universally acknowledged, that", "Emma Woodhouse, handsome,"]


def _hf_greedy(model_dir, prompts, new_tokens):
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(EMBEDDED_MODELS["gpt2"].parent.parent / "tokenizer")
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


def _expected_kernels(kernels: str) -> str:
    from edgelm.runtime import native

    return "edgelm" if kernels == "auto" and native.library_path() is not None else "onnxruntime"


@pytest.mark.parametrize("kernels", ["auto", "onnxruntime"])
@pytest.mark.parametrize("name", ["gpt2", "gpt-neo"])
def test_greedy_matches_transformers_past_the_local_window(embedded_artifact, name, kernels):
    # 200 new tokens: the embedded GPT-Neo's window is 64, so local layers evict during decoding, and
    # its window-sized cache (window + 64 rows on the CPU, kv.py) fills and compacts.
    # The default export on the default kernels (edgelm's: the packed graph, made as it loads) and on ONNX Runtime's
    gen = Generator.load(embedded_artifact[name], kernels=kernels)
    assert gen.art.kernels == _expected_kernels(kernels)
    ours = gen.generate(PROMPTS[0], SamplingConfig(max_new_tokens=200, stop_at_eos=False))
    theirs = _hf_greedy(EMBEDDED_MODELS[name], PROMPTS[:1], 200)[0]
    assert ours.token_ids == theirs
    assert ours.finish_reason == "length" and len(ours.token_ids) == 200
    if name == "gpt-neo":  # the run outgrew the window cache's capacity at least once
        from edgelm.runtime.kv import WINDOW_SLACK

        window = [c["window"] for c in gen.art.manifest["io"]["kv_cache"] if c["kind"] == "window"]
        assert window and len(gen.tokenizer.encode(PROMPTS[0])) + 200 > window[0] + WINDOW_SLACK


@pytest.mark.parametrize("kernels", ["auto", "onnxruntime"])
@pytest.mark.parametrize("name", ["gpt2", "gpt-neo"])
def test_left_padded_batch_matches_transformers(embedded_artifact, name, kernels):
    gen = Generator.load(embedded_artifact[name], kernels=kernels)
    assert gen.art.kernels == _expected_kernels(kernels)
    ours = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=70, stop_at_eos=False))
    theirs = _hf_greedy(EMBEDDED_MODELS[name], PROMPTS, 70)
    assert [r.token_ids for r in ours] == theirs
    assert len({len(r.prompt_ids) for r in ours}) == 2  # the prompts really had different lengths


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo"])
def test_generation_ends_on_any_listed_end_of_text_id_as_transformers_does(embedded_artifact, name, tmp_path):
    """generation_config.json lists end ids besides <|endoftext|>: one that the first prompt's greedy run
    reaches a few tokens in, and the second's where it does not end the first row sooner (the embedded
    GPT-Neo repeats itself, so its second row runs to its length). Each row of the batch ends where
    transformers' generate ends it, and the end id itself is not part of the result."""
    import shutil

    import torch
    import transformers

    from edgelm.export import export_model

    free = [r.token_ids for r in Generator.load(embedded_artifact[name]).generate(
        PROMPTS, SamplingConfig(max_new_tokens=40, stop_at_eos=False))]
    first_new = [next((i, t) for i, t in enumerate(row) if i >= 1 and t not in row[:i]) for row in free]
    ends = {50256, first_new[0][1]} | ({first_new[1][1]} if first_new[1][1] not in free[0][:first_new[0][0]] else set())
    stop = [next((i for i, t in enumerate(row) if t in ends), None) for row in free]
    assert stop[0] == first_new[0][0] >= 1 and (name == "gpt-neo" or stop[1] >= 1)
    src = tmp_path / "m"
    shutil.copytree(EMBEDDED_MODELS[name], src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(ends)}))
    gen = Generator.load(export_model(str(src), tmp_path / "a", validate=False, progress=False) and tmp_path / "a")
    assert gen.art.eos_token_ids == ends
    ours = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=40))
    assert [(r.finish_reason, r.token_ids) for r in ours] == [
        ("length", row) if at is None else ("eos", row[:at]) for row, at in zip(free, stop)]

    tok = transformers.AutoTokenizer.from_pretrained(EMBEDDED_MODELS["gpt2"].parent.parent / "tokenizer")
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=50256)
    theirs = [row[enc["input_ids"].shape[1]:].tolist() for row in out]
    for mine, their, row, at in zip(ours, theirs, free, stop):  # transformers keeps the end id, then pads
        assert their == (row if at is None else mine.token_ids + [row[at]] + [50256] * (len(their) - at - 1))


def test_the_models_own_sampling_defaults_apply_unless_overridden(tmp_path):
    """A generation_config.json that asks for sampling (do_sample, temperature, top_k, repetition_penalty)
    reaches the manifest; the Python API, the command line and the server start from it, as transformers'
    generate does, and what the user sets goes over it (--greedy included)."""
    import shutil

    from edgelm.export import export_model
    from edgelm.runtime.server import parse_completion_request

    src = tmp_path / "m"
    shutil.copytree(EMBEDDED_MODELS["gpt2"], src)
    model = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": None, "repetition_penalty": 1.3}
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 50256, **model}))
    manifest = export_model(str(src), tmp_path / "a", validate=False, progress=False)
    defaults = {k: v for k, v in model.items() if v is not None}  # null: not set
    assert manifest["generation"] == defaults
    gen = Generator.load(tmp_path / "a")
    run = dict(max_new_tokens=24, seed=3, stop_at_eos=False)
    assert gen.generate(PROMPTS[0], **run).token_ids == gen.generate(PROMPTS[0], SamplingConfig(
        greedy=False, temperature=0.8, top_k=20, repetition_penalty=1.3, **run)).token_ids
    assert gen.generate(PROMPTS[0], greedy=True, **run).token_ids == gen.generate(PROMPTS[0], SamplingConfig(
        repetition_penalty=1.3, **run)).token_ids != gen.generate(PROMPTS[0], SamplingConfig(**run)).token_ids

    def cli(*extra):
        r = _cli("generate", str(tmp_path / "a"), PROMPTS[0], "-n", "4", "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["sampling"]

    picked = {k: cli(*flags) for k, flags in (("model", ()), ("greedy", ("--greedy",)), ("top_k", ("--top-k", "5")))}
    assert {k: picked["model"][k] for k in ("greedy", "temperature", "top_k", "repetition_penalty")} == {
        "greedy": False, "temperature": 0.8, "top_k": 20, "repetition_penalty": 1.3}
    assert picked["greedy"]["greedy"] is True and picked["greedy"]["repetition_penalty"] == 1.3
    assert (picked["top_k"]["top_k"], picked["top_k"]["temperature"]) == (5, 0.8)
    r = _cli("generate", str(tmp_path / "a"), PROMPTS[0], "-n", "2")
    assert "[sampling, as the model's generation_config.json asks (temperature 0.8, top_k 20, repetition_penalty " \
           "1.3); --greedy for argmax]" in r.stderr
    (row,), _ = parse_completion_request({"prompt": "Hello"}, gen, "m")
    assert (row.cfg.greedy, row.cfg.temperature, row.cfg.top_k, row.cfg.repetition_penalty) == (False, 0.8, 20, 1.3)
    (row,), _ = parse_completion_request({"prompt": "Hello", "temperature": 0, "top_k": 0}, gen, "m")
    assert row.cfg.greedy and row.cfg.top_k == 0


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo"])
def test_greedy_steps_screen_the_lm_head_and_give_the_same_tokens(embedded_artifact, name):
    """On edgelm's kernels, greedy rows without a repetition penalty take the LM head's screen: the same
    tokens as the full product (one prompt, and a padded batch, past GPT-Neo's window), where the
    session's logits really are estimates away from the argmax; any sampling or penalized row turns it off."""
    from edgelm.runtime.native import SCREEN_INPUT

    gen = Generator.load(embedded_artifact[name])
    assert gen.screens and gen.art.kernels == "edgelm"
    cfg = SamplingConfig(max_new_tokens=90, stop_at_eos=False)
    runs = {}
    for on in (True, False):
        gen.screen = on
        runs[on] = [r.token_ids for r in gen.generate(PROMPTS, cfg)] + [gen.generate(PROMPTS[0], cfg).token_ids]
    assert runs[True] == runs[False]
    gen.screen = True
    rows = [gen.prepare(PROMPTS[0], cfg), gen.prepare(PROMPTS[1], cfg)]
    assert gen.screened(rows) and gen.screened(rows * 2) and not gen.screened(rows * 3)  # up to 4 rows
    assert not gen.screened(rows + [gen.prepare(PROMPTS[0], SamplingConfig(greedy=False, seed=1))])
    assert not gen.screened([gen.prepare(PROMPTS[0], SamplingConfig(repetition_penalty=1.2))])
    if name != "gpt2":  # the session on its own, below: GPT-2's empty caches are simple to feed
        return
    ids = np.array([gen.tokenizer.encode(PROMPTS[0])])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "num_logits_to_keep": np.array(1),
             "position_ids": np.arange(ids.shape[1])[None],
             **{i.name: np.zeros([d if isinstance(d, int) else 1 if "batch" in str(d) else 0 for d in i.shape],
                                 np.float32) for i in gen.art.session.get_inputs() if i.name.startswith("past")}}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in gen.art.session.get_inputs()}}
    full, screened = (gen.art.session.run(["logits"], {**feeds, SCREEN_INPUT: np.array(on)})[0][0, -1] for on in (0, 1))
    assert screened.argmax() == full.argmax() and screened.max() == full.max() and not np.array_equal(screened, full)


@pytest.fixture(scope="module")
def right_padded_artifact(tmp_path_factory):
    """{name: artifact} of the embedded models with right padding (fp16 graphs' contract, for CUDA), in fp32."""
    from edgelm.export import export_model

    root = tmp_path_factory.mktemp("right")
    return {name: export_model(str(d), root / name, progress=False, padding="right") and root / name
            for name, d in EMBEDDED_MODELS.items()}


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo"])
def test_right_padded_graphs_match_transformers(right_padded_artifact, name):
    """Greedy past GPT-Neo's local window, and a batch of prompts of different lengths: each prefilled
    on its own into its row of the cache, then decoded together, each row at its own length."""
    gen = Generator.load(right_padded_artifact[name])
    assert gen.art.manifest["io"]["padding"] == "right"
    assert gen.art.kernels == "onnxruntime"  # edgelm's attention reads a left-padded mask
    ours = gen.generate(PROMPTS[0], SamplingConfig(max_new_tokens=100, stop_at_eos=False))
    assert ours.token_ids == _hf_greedy(EMBEDDED_MODELS[name], PROMPTS[:1], 100)[0]
    batch = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=70, stop_at_eos=False))
    assert [r.token_ids for r in batch] == _hf_greedy(EMBEDDED_MODELS[name], PROMPTS, 70)
    lengths = [len(r.prompt_ids) for r in batch]
    assert lengths[0] != lengths[1]
    # each row's tokens at the front of its rows of the global layer's key buffer, nothing after them
    filled = (np.abs(gen.last_cache._host[0]).sum(axis=(1, 3)) > 0).sum(axis=1)
    assert filled.tolist() == [n + 70 - 1 for n in lengths]  # the last token is sampled, never fed back


def test_cuda_takes_only_graphs_whose_attention_it_can_run(tiny_artifact, tiny_model_dir, right_padded_artifact, tmp_path,
                                                          monkeypatch):
    """ONNX Runtime would run fp32 or biased attention on the CPU inside a CUDA session: refused at load.
    So is a CUDA provider that is listed but does not start (onnxruntime-gpu without a GPU), which
    ONNX Runtime's Python session would replace with the CPU."""
    import onnxruntime as ort

    from edgelm.export import export_model

    for art in (tiny_artifact["gpt2"], right_padded_artifact["gpt-neo"]):
        with pytest.raises(InputError, match="computes attention in fp32, .* export an fp16 artifact for CUDA"):
            Generator.load(art, provider="cuda")
    fp16 = tmp_path / "fp16"
    export_model(str(tiny_model_dir["gpt_neo"]), fp16, dtype="fp16", progress=False)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match="this ONNX Runtime has no CUDA provider"):
            Generator.load(fp16, provider="cuda")
        listed = ort.get_available_providers()
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
        with pytest.raises(DependencyError, match=r"could not start its CUDA provider \(the session runs on "
                                                  r"CPUExecutionProvider\): .* or use --provider cpu"):
            Generator.load(fp16, provider="cuda")
        monkeypatch.undo()
    manifest = json.loads((fp16 / "manifest.json").read_text())
    manifest["io"]["padding"] = "left"  # as fp16 artifacts were before right padding
    (fp16 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="padding bias, which ONNX Runtime's CUDA kernel refuses .* export it again"):
        Generator.load(fp16, provider="cuda")


@pytest.fixture(scope="module")
def packed_artifact(tmp_path_factory):
    """{name: artifact} of the embedded models in the packed linear layout (edgelm's own operator), their
    weights in an external data file as a large model's are."""
    from edgelm.export import export_model
    from edgelm.runtime import native

    if native.library_path() is None:
        pytest.skip("edgelm's operator library is not built")
    root = tmp_path_factory.mktemp("packed")
    return {name: export_model(str(d), root / name, progress=False, linear_layout="packed", external_data=True) and root / name
            for name, d in EMBEDDED_MODELS.items()}


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo"])
def test_packed_layout_matches_transformers(packed_artifact, name):
    """Greedy past GPT-Neo's local window, and a left-padded batch (prompt steps of 2 rows through the kernel)."""
    gen = Generator.load(packed_artifact[name])
    ours = gen.generate(PROMPTS[0], SamplingConfig(max_new_tokens=100, stop_at_eos=False))
    assert ours.token_ids == _hf_greedy(EMBEDDED_MODELS[name], PROMPTS[:1], 100)[0]
    batch = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=40, stop_at_eos=False))
    assert [r.token_ids for r in batch] == _hf_greedy(EMBEDDED_MODELS[name], PROMPTS, 40)


def test_packed_layout_runs_on_the_cpu_only(packed_artifact):
    with pytest.raises(InputError, match="packed linear layout, whose operator runs on the CPU only"):
        Generator.load(packed_artifact["gpt2"], provider="cuda")


def _maps_file(path) -> bool:
    """Whether this process has ``path`` mapped (Linux)."""
    target = str(Path(path).resolve())
    return any(line.rstrip("\n").endswith(target) for line in open("/proc/self/maps"))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_packed_weights_in_memory_or_mapped(packed_artifact):
    """By default a packed artifact's weights stay in ONNX Runtime's mapping of its data file; with
    weights="memory" they are copied at load and the file is not mapped once the session exists. Same tokens."""
    art = packed_artifact["gpt2"]
    data = art / "model.onnx.data"
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    in_memory = Generator.load(art, weights="memory")
    assert not _maps_file(data)
    mapped = Generator.load(art)
    assert _maps_file(data)
    assert mapped.screens and in_memory.screens  # the LM head's screen switch added to the file's graph too
    expected = mapped.generate(PROMPTS[0], cfg).token_ids
    assert in_memory.generate(PROMPTS[0], cfg).token_ids == expected
    mapped.screen = False
    assert mapped.generate(PROMPTS[0], cfg).token_ids == expected
    r = _cli("generate", str(art), PROMPTS[0], "-n", "12", "--ignore-eos", "--json", "--weights", "memory")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == expected
    with pytest.raises(InputError, match="weights 'disk' is unknown; choose one of mapped, memory"):
        Generator.load(art, weights="disk")


def test_default_export_runs_on_edgelm_kernels_from_memory(packed_artifact, right_padded_artifact, tmp_path):
    """A conv-layout artifact (weights in a data file, as a large model's are) loads on edgelm's kernels:
    its packed graph's weights are held in this process's memory (as many bytes as the packed export's,
    the data file not mapped), and it generates what the packed export and ONNX Runtime's kernels do."""
    from edgelm.export import export_model
    from edgelm.manifest import read_manifest
    from edgelm.runtime.artifact import kernels_as_exported

    art = tmp_path / "conv"
    export_model(str(EMBEDDED_MODELS["gpt2"]), art, progress=False, external_data=True)
    assert read_manifest(art)["graph"]["linear_layout"] == "conv"
    gen = Generator.load(art)
    assert gen.art.kernels == "edgelm" and not _maps_file(art / "model.onnx.data")
    held = sum(a.nbytes for a in gen.art.held[0])
    packed_bytes = read_manifest(packed_artifact["gpt2"])["graph"]["weight_bytes"]
    assert 0.99 * packed_bytes < held <= packed_bytes  # every large weight, once (the tied table too)
    cfg = SamplingConfig(max_new_tokens=40, stop_at_eos=False)
    tokens = gen.generate(PROMPTS, cfg)
    assert [r.token_ids for r in tokens] == [r.token_ids for r in Generator.load(packed_artifact["gpt2"]).generate(PROMPTS, cfg)]
    assert [r.token_ids for r in tokens] == [r.token_ids for r in Generator.load(art, kernels="onnxruntime").generate(PROMPTS, cfg)]
    # what the layout benchmarks run: each graph as exported
    assert kernels_as_exported(read_manifest(art)) == "onnxruntime"
    assert kernels_as_exported(read_manifest(packed_artifact["gpt2"])) == "auto"
    r = _cli("generate", str(art), PROMPTS[0], "-n", "8", "--ignore-eos", "--json", "--kernels", "onnxruntime")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kernels"] == "onnxruntime" and json.loads(r.stdout)["token_ids"] == tokens[0].token_ids[:8]
    # what edgelm's kernels cannot run is refused with one sentence when asked for by name
    with pytest.raises(InputError, match="cannot run on edgelm's kernels: it takes right padding.*--kernels onnxruntime"):
        Generator.load(right_padded_artifact["gpt2"], kernels="edgelm")
    with pytest.raises(InputError, match="packed linear layout, which only edgelm's operators run"):
        Generator.load(packed_artifact["gpt2"], kernels="onnxruntime")
    with pytest.raises(InputError, match="kernels 'fast' is unknown; choose one of auto, edgelm, onnxruntime"):
        Generator.load(art, kernels="fast")
    # a graph the rewrite does not recognize (here: a right-padded graph whose manifest says left)
    # runs as exported under auto, and is refused with the reason when edgelm's kernels are asked for
    odd = tmp_path / "odd"
    shutil.copytree(right_padded_artifact["gpt2"], odd)
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest["io"]["padding"] = "left"
    (odd / "manifest.json").write_text(json.dumps(manifest))
    assert Generator.load(odd).art.kernels == "onnxruntime"
    with pytest.raises(InputError, match="cannot run on edgelm's kernels: this graph's attention takes right padding"):
        Generator.load(odd, kernels="edgelm")
    # ONNX Runtime computes with the held arrays themselves, not a copy: zero the tied table, the logits change
    from edgelm.optimize.evaluate import prompt_feed

    from edgelm.runtime.native import SCREEN_INPUT

    feeds = prompt_feed(gen.art.manifest, np.array([[5, 6, 7]], np.int64), gen.art.kv_dtype, 1)
    feeds[SCREEN_INPUT] = np.array(0)  # the Generator's session: its LM head's screen switch, off (the full product)
    before = gen.art.session.run(["logits"], feeds)[0]
    max(gen.art.held[0], key=lambda a: a.nbytes)[...] = 0
    assert np.abs(before).max() > 0 and not np.abs(gen.art.session.run(["logits"], feeds)[0]).any()


def test_tiny_models_match_transformers(tiny_artifact, tiny_model_dir):
    for arch in ("gpt2", "gpt_neo"):  # tiny GPT-Neo window is 4
        gen = Generator.load(tiny_artifact[arch])
        ours = gen.generate(PROMPTS[1], SamplingConfig(max_new_tokens=12, stop_at_eos=False))
        assert ours.token_ids == _hf_greedy(tiny_model_dir[arch], PROMPTS[1:], 12)[0]


def test_kv_buffers_are_allocated_once_and_written_in_place(embedded_artifact):
    gen = Generator.load(embedded_artifact["gpt-neo"])
    addresses = []
    filled = []
    cfg = SamplingConfig(max_new_tokens=80, stop_at_eos=False)
    for event in gen.stream(PROMPTS[0], cfg):
        cache = gen.last_cache
        addresses.append(cache.buffer_addresses())
        host = cache._host[0]  # layer 0 (global) key buffer, (B, N, max_len, H)
        filled.append(int((np.abs(host).sum(axis=(0, 1, 3)) > 0).sum()))
    assert all(a == addresses[0] for a in addresses)  # same buffers at every step
    prompt = len(gen.tokenizer.encode(PROMPTS[0]))
    # the operator wrote each step's key into our buffer: one more filled row per step
    assert filled == [prompt + k for k in range(80)]
    window = [e for e in gen.art.manifest["io"]["kv_cache"] if e["kind"] == "window"]
    assert window and cache._host[2].shape[2] == window[0]["window"] + 64  # local layer: window-sized buffer
    assert cache._host[0].shape[2] == prompt + 80


def test_sampling_is_reproducible_with_a_seed(embedded_artifact):
    gen = Generator.load(embedded_artifact["gpt2"])
    cfg = dict(max_new_tokens=30, greedy=False, temperature=0.9, top_k=50, top_p=0.95, stop_at_eos=False)
    a = gen.generate(PROMPTS[0], SamplingConfig(seed=7, **cfg)).token_ids
    b = gen.generate(PROMPTS[0], SamplingConfig(seed=7, **cfg)).token_ids
    c = gen.generate(PROMPTS[0], SamplingConfig(seed=8, **cfg)).token_ids
    assert a == b and a != c
    greedy = gen.generate(PROMPTS[0], SamplingConfig(max_new_tokens=30, stop_at_eos=False)).token_ids
    top1 = gen.generate(PROMPTS[0], SamplingConfig(seed=1, **{**cfg, "top_k": 1})).token_ids
    assert top1 == greedy


def test_top_k_top_p_and_repetition_penalty_semantics():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    rng = np.random.default_rng(0)
    draws = {int(next_tokens(logits, SamplingConfig(greedy=False, top_k=2), rng)[0]) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(next_tokens(logits, SamplingConfig(greedy=False, top_p=0.7), rng)[0]) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    # draws follow the renormalised probabilities of what is kept (4000 draws: 3 sigma < 0.025)
    batch = np.repeat(logits, 4000, axis=0)
    for cfg, expected in ((SamplingConfig(greedy=False), [0.5, 0.3, 0.15, 0.05]),
                          (SamplingConfig(greedy=False, top_k=3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
                          (SamplingConfig(greedy=False, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])):
        freq = np.bincount(next_tokens(batch, cfg, rng), minlength=4) / len(batch)
        np.testing.assert_allclose(freq, expected, atol=0.025)
    seen = np.array([[True, False, False, False]])
    pos = np.array([[2.0, 1.5, 0.0, -1.0]], dtype=np.float32)
    assert next_tokens(pos, SamplingConfig(repetition_penalty=2.0), None, seen)[0] == 1  # 2.0 / 2 < 1.5


def _nucleus_by_full_sort(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The top-p set of one row from a stable sort of the whole vocabulary (the definition)."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()
    cumulative = np.cumsum(probs)
    return np.sort(order[~(cumulative - probs >= top_p)])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99, 0.999999])
def test_top_p_sorts_only_the_candidates_it_needs(top_p):
    """nucleus_only keeps exactly the set a sort of all 50257 logits keeps: peaked and flat rows
    (a flat row needs more than the first 256 candidates), ties at the cut, -inf from top-k."""
    from edgelm.runtime.sampling import NUCLEUS_CANDIDATES, nucleus_only

    rng = np.random.default_rng(3)
    peaked = rng.standard_normal(50257).astype(np.float32) * 4
    flat = rng.standard_normal(50257).astype(np.float32) * 0.1
    tied = np.round(rng.standard_normal(50257) * 2).astype(np.float32)  # a few values, each many times
    topk = peaked.copy()
    topk[topk < np.partition(topk, -40)[-40]] = -np.inf
    for row in (peaked, flat, tied, topk, np.zeros(7, np.float32)):
        got = row.copy()
        nucleus_only(got, top_p)
        assert np.array_equal(np.flatnonzero(np.isfinite(got)), _nucleus_by_full_sort(row, top_p))
        assert np.array_equal(got[np.isfinite(got)], row[np.isfinite(got)])
    got = flat.copy()
    nucleus_only(got, 0.9)
    assert np.isfinite(got).sum() > NUCLEUS_CANDIDATES  # the flat row did need more


def test_stop_strings_and_streaming_agree(embedded_artifact):
    gen = Generator.load(embedded_artifact["gpt2"])
    full = gen.generate(PROMPTS[0], SamplingConfig(max_new_tokens=40, stop_at_eos=False)).text
    stop = full[10:14]
    assert stop.strip()
    result = gen.generate(PROMPTS[0], SamplingConfig(max_new_tokens=40, stop=(stop,), stop_at_eos=False))
    assert result.finish_reason == "stop" and result.text == full[: full.find(stop)]
    streamed = "".join(e.text for e in gen.stream(PROMPTS[0], SamplingConfig(max_new_tokens=40, stop=(stop,),
                                                                              stop_at_eos=False)))
    assert streamed == result.text
    # several stop strings: the text ends at the earliest match, whatever their order in the list
    later = full[20:24]
    assert later.strip() and full.find(later) > full.find(stop)
    for stops in [(stop, later), (later, stop)]:
        cut = gen.generate(PROMPTS[0], SamplingConfig(max_new_tokens=40, stop=stops, stop_at_eos=False))
        assert cut.text == result.text
    # one stop string given as a plain string is that string, not its characters
    assert SamplingConfig(stop="time").stop == ("time",)


def test_incremental_detokenization_matches_decoding_everything(embedded_artifact):
    """Rows decode only the ids after the last whole-character boundary; token by token (characters
    split over several byte-level tokens included) the text is that of decoding every id, and a
    stream of the deltas adds up to it."""
    from edgelm.runtime.generator import Row

    gen = Generator.load(embedded_artifact["gpt2"])
    tok = gen.tokenizer
    text = "Caf\u00e9 cr\u00e8me \u2014 na\u00efve \u00fcber \U0001F389\U0001F680 \u4e2d\u6587\u5b57 and plain words. " * 4
    ids = tok.encode(text)
    assert len(ids) > 40 and any(tok.decode([i]).endswith("\ufffd") for i in ids)  # split characters
    row = Row(tok, "", [1], SamplingConfig(max_new_tokens=len(ids), stop_at_eos=False), frozenset())
    streamed = ""
    for n, i in enumerate(ids, 1):
        streamed += row.push(i)
        assert row._decoded() == tok.decode(ids[:n])
    assert row._clean_at > 0 and streamed == row.text == tok.decode(ids) == text


def test_generate_decodes_each_row_once_and_gets_the_streamed_text(embedded_artifact, monkeypatch):
    """generate() without stop strings reads no text before a row ends, so its steps decode nothing
    and the ids are decoded once; the text is the stream's, sampled tokens and split characters alike."""
    gen = Generator.load(embedded_artifact["gpt2"])
    calls = []
    decode = gen.tokenizer.decode
    monkeypatch.setattr(gen.tokenizer, "decode", lambda ids: calls.append(len(ids)) or decode(ids))
    for seed in (1, 2, 3):
        cfg = SamplingConfig(max_new_tokens=30, greedy=False, temperature=1.5, seed=seed, stop_at_eos=False)
        events = list(gen.stream(PROMPTS[0], cfg))
        calls.clear()
        result = gen.generate(PROMPTS[0], cfg)
        assert calls == [30]
        assert result.token_ids == [e.token_id for e in events]
        assert result.text == "".join(e.text for e in events) == decode(result.token_ids)
        assert result.finish_reason == events[-1].finished == "length"


def test_each_row_of_a_batch_stops_on_its_own(embedded_artifact):
    gen = Generator.load(embedded_artifact["gpt2"])
    alone = [gen.generate(p, SamplingConfig(max_new_tokens=25, stop_at_eos=False)).text for p in PROMPTS]
    stop = alone[0][5:9]
    results = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=25, stop=(stop,), stop_at_eos=False))
    assert results[0].finish_reason == "stop" and results[0].text == alone[0][: alone[0].find(stop)]
    if stop not in alone[1]:
        assert results[1].finish_reason == "length" and results[1].text == alone[1]


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo"])
def test_rows_with_their_own_lengths_and_budgets_share_a_batch(embedded_artifact, name):
    """What the server batches: a long prompt that asks for few tokens beside a short one that asks
    for many. Together they span more than the context (480 + 400 > 512), though each fits: the
    finished long row keeps stepping as padding, and each row's tokens are those it gets alone."""
    gen = Generator.load(embedded_artifact[name])
    prompts = ["word " * 480, PROMPTS[0]]
    cfgs = [SamplingConfig(max_new_tokens=8, stop_at_eos=False), SamplingConfig(max_new_tokens=400, stop_at_eos=False)]
    assert len(gen.tokenizer.encode(prompts[0])) + 400 > gen.max_positions
    events = gen.run_rows(prompts, cfgs)
    try:
        while True:
            next(events)
    except StopIteration as end:
        together = end.value
    alone = [gen.generate(p, c) for p, c in zip(prompts, cfgs)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in together] == [8, 400]
    # decode speed counts the tokens rows made, not the finished row's padding
    t = together[0].timings
    assert t["new_tokens"] == 408 and t["decode_steps"] == 399


def test_a_batch_streams_each_rows_tokens(embedded_artifact):
    gen = Generator.load(embedded_artifact["gpt2"])
    cfg = SamplingConfig(max_new_tokens=30, stop_at_eos=False)
    texts, ends = ["", ""], [None, None]
    for event in gen.stream(PROMPTS, cfg):
        assert ends[event.row] is None  # nothing after a row's last event
        texts[event.row] += event.text
        ends[event.row] = event.finished
    assert texts == [r.text for r in gen.generate(PROMPTS, cfg)] and ends == ["length", "length"]
    assert "".join(e.text for e in gen.stream(PROMPTS[0], cfg)) == texts[0]  # one prompt: as before


def test_eos_ends_a_row(embedded_artifact, monkeypatch):
    gen = Generator.load(embedded_artifact["gpt2"])
    first = gen.generate(PROMPTS[0], SamplingConfig(max_new_tokens=3, stop_at_eos=False)).token_ids
    monkeypatch.setitem(gen.art.manifest["tokenizer"], "eos_token_ids", [first[1]])
    r = Generator(gen.art).generate(PROMPTS[0], SamplingConfig(max_new_tokens=20))
    assert r.finish_reason == "eos" and r.token_ids == first[:1]
    # a manifest written before eos_token_ids ends on its one eos_token_id
    monkeypatch.delitem(gen.art.manifest["tokenizer"], "eos_token_ids")
    monkeypatch.setitem(gen.art.manifest["tokenizer"], "eos_token_id", first[2])
    r = Generator(gen.art).generate(PROMPTS[0], SamplingConfig(max_new_tokens=20))
    assert r.finish_reason == "eos" and r.token_ids == first[:2]


def test_context_overflow_is_an_error_or_the_chosen_policy(embedded_artifact):
    gen = Generator.load(embedded_artifact["gpt2"])
    long_prompt = "word " * 600  # > 512 positions
    with pytest.raises(InputError, match="context of 512"):
        gen.generate(long_prompt, SamplingConfig(max_new_tokens=8))
    trunc = Generator.load(embedded_artifact["gpt2"], context_policy="truncate")
    r = trunc.generate(long_prompt, SamplingConfig(max_new_tokens=8, stop_at_eos=False))
    assert len(r.prompt_ids) == 512 - 8 and len(r.token_ids) == 8


def test_bad_sampling_settings_are_refused():
    with pytest.raises(InputError, match="temperature"):
        SamplingConfig(temperature=0)
    for field in ("temperature", "repetition_penalty"):  # inf made every token equally likely, or none
        with pytest.raises(InputError, match=f"{field} must be a finite number > 0"):
            SamplingConfig(**{field: float("inf")})
    with pytest.raises(InputError, match="top_p"):
        SamplingConfig(top_p=1.5)
    for seed in (-1, 1.5, True):
        with pytest.raises(InputError, match="seed must be an integer >= 0"):
            SamplingConfig(seed=seed)
    with pytest.raises(InputError, match="non-empty"):
        SamplingConfig(stop="")


@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1000)).astype(np.float32) * 10
    cfg = SamplingConfig(greedy=False, temperature=temperature)
    for _ in range(5):
        assert np.array_equal(next_tokens(logits, cfg, rng), logits.argmax(axis=-1))


def _cli(*args, timeout=300, stdin=""):
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, timeout=timeout,
                          input=stdin)


def test_cli_generate_json(embedded_artifact):
    r = _cli("generate", str(embedded_artifact["gpt2"]), PROMPTS[0], "-n", "12", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 12 and out["prompt_ids"] and out["text"]
    assert out["timings"]["time_to_first_token_s"] > 0 and out["timings"]["decode_tokens_per_s"] > 0


def test_cli_stream_prints_the_same_text(embedded_artifact):
    art = str(embedded_artifact["gpt2"])
    plain = _cli("generate", art, PROMPTS[0], "-n", "10", "--ignore-eos")
    streamed = _cli("generate", art, PROMPTS[0], "-n", "10", "--ignore-eos", "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0
    assert streamed.stdout.strip() == plain.stdout.strip()


def test_cli_generates_several_prompts_as_one_batch_and_reads_a_prompt_from_stdin(embedded_artifact):
    art = str(embedded_artifact["gpt2"])
    expected = Generator.load(art).generate(PROMPTS, SamplingConfig(max_new_tokens=10, stop_at_eos=False))
    r = _cli("generate", art, PROMPTS[0], "-", "-n", "10", "--ignore-eos", "--json", stdin=PROMPTS[1])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["prompt"] for o in out] == PROMPTS and [o["token_ids"] for o in out] == [e.token_ids for e in expected]
    assert out[0]["timings"]["batch"] == 2
    plain = _cli("generate", art, "-", PROMPTS[1], "-n", "10", "--ignore-eos", stdin=PROMPTS[0])
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "".join(("\n" if i else "") + p + e.text + "\n" for i, (p, e) in enumerate(zip(PROMPTS, expected)))
    assert "in 2 rows" in plain.stderr


def test_too_many_threads_are_refused_by_the_python_api_too(embedded_artifact):
    with pytest.raises(InputError, match=r"\(4 per core\), got 100000"):
        Generator.load(embedded_artifact["gpt2"], threads=100000)


@pytest.mark.parametrize("case", ["stream", "stdin twice", "not utf-8", "threads", "truncate without room"])
def test_cli_prompt_problems_are_one_sentence(embedded_artifact, case):
    art = str(embedded_artifact["gpt2"])
    args, stdin, words = {
        "stream": ([PROMPTS[0], PROMPTS[1], "--stream"], b"", "give one prompt, or drop --stream"),
        "stdin twice": (["-", "-"], b"x", "give - once"),
        "not utf-8": (["-"], b"caf\xe9", "standard input is not UTF-8 text"),
        "threads": (["hi", "--threads", "100000"], b"", "(4 per core), got 100000"),
        "truncate without room": (["hi", "-n", "512", "--context-policy", "truncate"], b"",
                                  "512 new tokens leave no room for the prompt in the model's context of 512; ask for "
                                  "at most 511"),
    }[case]
    r = subprocess.run([sys.executable, "-m", "edgelm", "generate", art, *args], capture_output=True, input=stdin,
                       timeout=300)
    lines = [line for line in r.stderr.decode().splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr


@pytest.mark.parametrize("kernels", ["auto", "onnxruntime"])
def test_a_corrupt_graph_is_one_sentence(embedded_artifact, tmp_path, kernels):
    art = tmp_path / "art"
    shutil.copytree(embedded_artifact["gpt2"], art)
    graph = art / "model.onnx"
    graph.write_bytes(b"\xff" * graph.stat().st_size)  # the right size, not a graph
    r = _cli("generate", str(art), "hi", "--kernels", kernels)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "model.onnx" in lines[0] and ("export the model again" in lines[0] or "cannot load" in lines[0])


def test_cli_sampling_flags_reach_the_sampler(embedded_artifact):
    art = str(embedded_artifact["gpt2"])

    def run(*extra):
        r = _cli("generate", art, PROMPTS[0], "-n", "24", "--ignore-eos", "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    flags = ["--temperature", "1.5", "--top-k", "200", "--top-p", "0.95", "--repetition-penalty", "1.3"]
    a, b, c = run(*flags, "--seed", "7"), run(*flags, "--seed", "7"), run(*flags, "--seed", "8")
    greedy, explicit = run(), run("--greedy")
    assert a["sampling"]["greedy"] is False and a["sampling"]["top_k"] == 200 and a["sampling"]["seed"] == 7
    assert a["sampling"]["repetition_penalty"] == 1.3 and a["sampling"]["top_p"] == 0.95
    assert a["token_ids"] == b["token_ids"]  # the seed makes sampling reproducible
    assert a["token_ids"] != c["token_ids"] and a["token_ids"] != greedy["token_ids"]
    assert explicit["token_ids"] == greedy["token_ids"] and greedy["sampling"]["greedy"] is True


@pytest.mark.parametrize("args,expected", [
    (["generate", "/nonexistent/artifact", "hi"], "not a folder"),
    (["generate", "{art}", "hi", "--provider", "cuda"], "CUDA"),
    (["generate", "{art}", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "{art}", "hi", "--seed", "-3"], "seed must be an integer >= 0"),
    (["generate", "{art}", "hi", "-n", "0"], "expected a number >= 1"),
    (["generate", "{art}", "hi", "--greedy", "--top-p", "0.5"], "--greedy takes the most likely token"),
])
def test_cli_generate_errors_are_one_sentence(embedded_artifact, args, expected):
    args = [a.replace("{art}", str(embedded_artifact["gpt2"])) for a in args]
    r = _cli(*args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr


@pytest.mark.parametrize("blocked", [("torch", "transformers"), ("torch", "transformers", "onnx")])
def test_runtime_runs_without_torch_or_transformers(embedded_artifact, blocked):
    """Generate in a process where importing torch or transformers fails: on the default kernels
    (edgelm's, where onnx turns the graph as it loads) and, with onnx blocked too, as exported."""
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in {blocked!r}:
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        from edgelm.cli import main
        rc = main(['generate', {str(embedded_artifact['gpt2'])!r}, 'Emma said', '-n', '5', '--json'])
        assert rc == 0
        assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # without onnx the graph runs as exported, on ONNX Runtime's kernels
    assert out["token_ids"] and out["kernels"] == ("onnxruntime" if "onnx" in blocked else _expected_kernels("auto"))


def test_runtime_install_has_no_torch():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"] + project["optional-dependencies"]["cpu"]).lower()
    assert "torch" not in runtime and "transformers" not in runtime and "onnxruntime" in runtime
    gpu = project["optional-dependencies"]["gpu"]
    assert any(d.startswith("onnxruntime-gpu") for d in gpu) and not any(d.startswith("onnxruntime>") for d in gpu)


def test_runtime_serves_optimum_artifacts_too(tiny_model_dir, tiny_artifact, tmp_path):
    pytest.importorskip("optimum.exporters.onnx")
    from edgelm.export import export_model

    out = tmp_path / "opt"
    export_model(str(tiny_model_dir["gpt_neo"]), out, backend="optimum", progress=False)
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    ours = [r.token_ids for r in Generator.load(tiny_artifact["gpt_neo"]).generate(PROMPTS, cfg)]
    theirs = [r.token_ids for r in Generator.load(out).generate(PROMPTS, cfg)]
    assert ours == theirs


def test_a_cuda_cache_is_zeroed_on_the_device_and_a_window_has_no_slack():
    """Without a GPU the CUDA cache is checked against a stand-in for ONNX Runtime's OrtValue: every
    bound buffer is made on device cuda:0 from zeros (uninitialised memory could hold NaN patterns),
    and a window cache is exactly the window (ONNX Runtime's CUDA kernel takes no slack)."""
    from types import SimpleNamespace

    from edgelm.runtime.kv import KVCache

    made = []

    def from_numpy(array, device="cpu", device_id=0):
        made.append((array.copy(), device, device_id))
        return len(made) - 1

    ort = SimpleNamespace(OrtValue=SimpleNamespace(ortvalue_from_numpy=from_numpy))
    spec = [{"kind": "full", "past_key": "pk0", "past_value": "pv0", "present_key": "k0", "present_value": "v0"},
            {"kind": "window", "window": 4, "past_key": "pk1", "past_value": "pv1", "present_key": "k1",
             "present_value": "v1"}]
    cache = KVCache(ort, spec, batch=2, max_len=10, heads=3, head_size=5, dtype=np.float16, device="cuda")
    assert [(a.shape, a.dtype, dev, i) for a, dev, i in made] == [((2, 3, 10, 5), np.float16, "cuda", 0)] * 2 + [
        ((2, 3, 4, 5), np.float16, "cuda", 0)] * 2
    assert all(not a.any() for a, _, _ in made) and not cache._host
