"""Export: parity with PyTorch, fused operators, manifest content, atomic output, error paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgelm.errors import InputError, OutputExistsError, UnsupportedModelError, ValidationError
from edgelm.export import ARCHITECTURES, export_model
from edgelm.manifest import read_manifest
from edgelm.optimize.evaluate import prompt_feed
from fixtures import TINY_CONFIGS, make_tiny_model

ARCHS = sorted(TINY_CONFIGS)


def test_every_architecture_has_a_tiny_model():
    assert set(ARCHITECTURES) == set(TINY_CONFIGS), "add a tiny config to tests/fixtures.py"


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_graph_has_one_attention_per_layer_and_no_softmax(tiny_artifact, arch):
    m = read_manifest(tiny_artifact[arch])
    ops = m["graph"]["operators"]
    layers = m["model"]["facts"]["num_layers"]
    assert ops["GroupQueryAttention"] == layers
    assert ops["SkipLayerNormalization"] == 2 * layers + 1
    assert ops["FastGelu"] == layers
    assert "Softmax" not in ops and "LayerNormalization" not in ops
    graph = onnx.load(str(tiny_artifact[arch] / "model.onnx"), load_external_data=False).graph
    names = [n.name for n in graph.node]
    assert "/model/layers.0/attn/GroupQueryAttention" in names and "/lm_head/MatMul" in names
    # GPT-2 scales by 1/sqrt(head size), GPT-Neo does not; GPT-Neo's local layer keeps its window
    attn = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in attn]
    head = m["model"]["facts"]["head_size"]
    if arch == "gpt2":
        assert all(abs(a["scale"] - head ** -0.5) < 1e-7 for a in attrs)
        assert all("local_window_size" not in a for a in attrs)
    else:
        assert all(a["scale"] == 1.0 for a in attrs)
        assert "local_window_size" not in attrs[0]
        assert attrs[1]["local_window_size"] == 4 and attrs[1]["sliding_window_cache"] == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_manifest_describes_the_artifact(tiny_artifact, arch):
    folder = tiny_artifact[arch]
    m = read_manifest(folder, verify_checksums=True)
    layers = m["model"]["facts"]["num_layers"]
    inputs = [i["name"] for i in m["io"]["inputs"]]
    outputs = [o["name"] for o in m["io"]["outputs"]]
    assert inputs[:4] == ["input_ids", "position_ids", "attention_mask", "num_logits_to_keep"]
    assert len(inputs) == 4 + 2 * layers and len(outputs) == 1 + 2 * layers
    sess_inputs = _session_io(folder)
    assert sess_inputs == (inputs, outputs)  # the manifest names exactly the graph's inputs and outputs
    kinds = [c["kind"] for c in m["io"]["kv_cache"]]
    assert kinds == (["full", "full"] if arch == "gpt2" else ["full", "window"])
    v = m["validation"]
    assert v["status"] == "passed"
    assert set(v["max_abs_diff"]) == {"logits", *outputs[1:]}
    assert all(0 <= d <= v["atol"] for d in v["max_abs_diff"].values())
    assert v["schedule"]["decode_steps"] >= 3 and v["schedule"]["batch"] == 2 and v["schedule"]["padded_tokens"] > 0
    if arch == "gpt_neo":
        assert v["schedule"]["total_tokens"] > 4  # beyond the local window
    assert {"model.onnx", "tokenizer.json", "vocab.json", "merges.txt"} <= set(m["files"])
    assert m["steps"][0]["name"] == "export" and m["steps"][0]["peak_rss_bytes"] > 0
    assert m["model"]["facts"]["tied_embeddings"] is True


def _session_io(folder):
    import onnxruntime as ort

    s = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return [i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_embedding_is_stored_once(tiny_artifact, arch):
    m = read_manifest(tiny_artifact[arch])
    f = m["model"]["facts"]
    embedding = f["vocab_size"] * f["hidden_size"]
    graph = onnx.load(str(tiny_artifact[arch] / "model.onnx"), load_external_data=False).graph
    big = [t for t in graph.initializer if np.prod(t.dims) == embedding]
    assert len(big) == 1
    params = _param_count(tiny_model_dir_for(tiny_artifact, arch))
    assert m["graph"]["weight_bytes"] <= 1.01 * 4 * params


def tiny_model_dir_for(tiny_artifact, arch):
    return read_manifest(tiny_artifact[arch])["model"]["source"]


def _param_count(model_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def test_external_data_is_one_file_and_validates(tiny_model_dir, tmp_path):
    out = tmp_path / "ext"
    m = export_model(str(tiny_model_dir["gpt_neo"]), out, progress=False, external_data=True)
    assert m["graph"]["external_data"] == "model.onnx.data"
    assert sorted(p.name for p in out.iterdir() if "onnx" in p.name) == ["model.onnx", "model.onnx.data"]
    assert m["validation"]["status"] == "passed"
    assert (out / "model.onnx").stat().st_size < 100_000  # the protobuf holds no weights


def test_wrong_weights_fail_validation_and_leave_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from edgelm.export import builder

    real = builder._Weights.linear

    def off_by_a_little(self, lw, i):
        w, b = real(self, lw, i)
        return w * 1.01, b

    monkeypatch.setattr(builder._Weights, "linear", off_by_a_little)
    out = tmp_path / "bad"
    with pytest.raises(ValidationError) as err:
        export_model(str(tiny_model_dir["gpt2"]), out, progress=False)
    assert "logits" in str(err.value) and len(err.value.failures) >= 2
    assert not out.exists() and not any(tmp_path.iterdir())  # no OUT, no temporary folder left


def test_existing_output_is_refused_without_force(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        export_model(str(tiny_model_dir["gpt2"]), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_model(str(tiny_model_dir["gpt2"]), out, progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_fp16_export_is_marked_honestly(tiny_model_dir, tmp_path):
    m = export_model(str(tiny_model_dir["gpt_neo"]), tmp_path / "h", dtype="fp16", progress=False)
    assert m["graph"]["dtype"] == "fp16"
    # attention in fp16 (ONNX Runtime's CUDA kernel has no other), with no padding bias (the CUDA kernel
    # refuses one): right padding, each row's length from its mask
    assert m["io"]["kv_dtype"] == "float16" and m["io"]["padding"] == "right"
    v = m["validation"]
    assert v["status"] in ("passed", "not_validated")
    if v["status"] == "passed":
        assert v["atol"] == 5e-2 and max(v["max_abs_diff"].values()) <= 5e-2
    else:
        assert v["reason"]
    g = onnx.load(str(tmp_path / "h" / "model.onnx"), load_external_data=False).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.initializer)
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert attention and all(len(n.input) < 11 or n.input[10] == "" for n in attention)
    assert "Cast" not in {n.op_type for n in g.node if "/attn/" in n.name}
    assert v["status"] != "passed" or v["schedule"]["padding"] == "right"


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padding_is_validated_with_rows_of_different_lengths(tiny_model_dir, tmp_path, arch):
    """The fp16 graphs' contract, exported in fp32: the validation prefills the shorter prompt on its own
    and decodes both rows at their own lengths (past the tiny GPT-Neo's window), against PyTorch."""
    m = export_model(str(tiny_model_dir[arch]), tmp_path / "r", padding="right", progress=False)
    assert m["io"]["padding"] == "right" and m["io"]["kv_dtype"] == "float32"
    v = m["validation"]
    assert v["status"] == "passed" and v["schedule"]["padding"] == "right" and v["schedule"]["padded_tokens"] > 0
    assert max(v["max_abs_diff"].values()) < 1e-4  # fp32: the same math as PyTorch's, row by row
    ops = m["graph"]["operators"]
    assert ops["ReduceSum"] == 1 and "Expand" not in ops  # each row's length from its mask; no bias


def test_padding_is_refused_where_it_cannot_be(tiny_model_dir, tmp_path):
    for kwargs, expected in (({"padding": "middle"}, "padding 'middle' is not available"),
                             ({"padding": "right", "linear_layout": "packed"}, "the packed layout"),
                             ({"padding": "right", "backend": "optimum"}, "the optimum backend"),
                             ({"padding": "left", "dtype": "fp16"}, "fp16 graphs take right padding"),
                             ({"atol": 1e-3, "validate": False}, "--no-validate switches the validation off"),
                             ({"rtol": 0.0, "validate": False}, "--no-validate switches the validation off")):
        with pytest.raises(InputError, match=expected):
            export_model(str(tiny_model_dir["gpt2"]), tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing", "no_config", "bad_config", "unknown_arch", "corrupt", "no_weights",
                                  "bad_head_size", "bad_embedded", "bad_atol", "config_list", "zero_heads",
                                  "text_heads", "bad_index", "inf_atol", "unwritable"])
def test_bad_input_is_one_clear_sentence(case, tiny_model_dir, tmp_path):
    src = tmp_path / "m"
    args = None
    if case == "missing":
        args = [str(tmp_path / "nope"), "-o", str(tmp_path / "o")]
    elif case == "bad_embedded":
        args = ["embedded:llama", "-o", str(tmp_path / "o")]
    elif case in ("bad_atol", "inf_atol"):
        args = [str(tiny_model_dir["gpt2"]), "-o", str(tmp_path / "o"), "--atol", "-1" if case == "bad_atol" else "inf"]
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("a file, not a folder")
        args = [str(tiny_model_dir["gpt2"]), "-o", str(blocker / "o"), "--no-validate"]
    else:
        import shutil

        shutil.copytree(tiny_model_dir["gpt2"], src)
        cfg = json.loads((src / "config.json").read_text())
        if case == "no_config":
            (src / "config.json").unlink()
        elif case == "bad_config":
            (src / "config.json").write_text("{not json")
        elif case == "unknown_arch":
            cfg["model_type"] = "llama"
            (src / "config.json").write_text(json.dumps(cfg))
        elif case == "bad_head_size":
            cfg.update(n_embd=36, n_head=3)
            (src / "config.json").write_text(json.dumps(cfg))
        elif case == "corrupt":
            data = (src / "model.safetensors").read_bytes()
            (src / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif case == "no_weights":
            (src / "model.safetensors").unlink()
        elif case == "config_list":
            (src / "config.json").write_text("[1, 2]")
        elif case in ("zero_heads", "text_heads"):
            cfg["n_head"] = 0 if case == "zero_heads" else "four"
            (src / "config.json").write_text(json.dumps(cfg))
        elif case == "bad_index":
            (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
            (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
        args = [str(src), "-o", str(tmp_path / "o")]
    r = _cli("export", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgelm export: error: "), r.stderr
    assert not (tmp_path / "o").exists()
    expected = {"missing": "no folder", "no_config": "no config.json", "bad_config": "not valid JSON",
                "unknown_arch": "GPT2LMHeadModel", "corrupt": "download it again",
                "no_weights": "no model.safetensors", "bad_head_size": "multiple of 8",
                "bad_embedded": "embedded:gpt2", "bad_atol": "positive", "config_list": "not an object",
                "zero_heads": "n_head is 0", "text_heads": "n_head is 'four'", "bad_index": "no weight_map",
                "inf_atol": "finite",
                "unwritable": "choose a writable location"}[case]
    assert expected in lines[0]


def _drop(*names):
    def mutate(src, cfg):
        for name in names:
            (src / name).unlink()
    return mutate


CONFIG_AND_TOKENIZER_CASES = {  # case: (architecture, change to the copy of the tiny model, expected message)
    "neo_no_window": ("gpt_neo", lambda src, cfg: cfg.pop("window_size"), "no field 'window_size'"),
    "neo_zero_window": ("gpt_neo", lambda src, cfg: cfg.update(window_size=0), "window_size is 0"),
    "neo_no_kinds": ("gpt_neo", lambda src, cfg: [cfg.pop("attention_layers"), cfg.pop("attention_types")],
                     "neither attention_layers nor attention_types"),
    "null_epsilon": ("gpt2", lambda src, cfg: cfg.update(layer_norm_epsilon=None), "layer_norm_epsilon is None"),
    "activation_list": ("gpt2", lambda src, cfg: cfg.update(activation_function=["gelu"]), "activation"),
    "bos_list": ("gpt2", lambda src, cfg: cfg.update(bos_token_id=[50256, 1]), "lists several ids"),
    "eos_outside": ("gpt2", lambda src, cfg: cfg.update(eos_token_id=60000), "token id in [0, 50257)"),
    "eos_list_outside": ("gpt2", lambda src, cfg: cfg.update(eos_token_id=[50256, 60000]),
                         "config.json's eos_token_id is [50256, 60000]; it must be a token id in [0, 50257) or a list"),
    "eos_empty_list": ("gpt2", lambda src, cfg: cfg.update(eos_token_id=[]), "eos_token_id is []"),
    "generation_eos_text": ("gpt2", lambda src, cfg: (src / "generation_config.json").write_text('{"eos_token_id": "2"}'),
                            "generation_config.json's eos_token_id is '2'"),
    "generation_not_json": ("gpt2", lambda src, cfg: (src / "generation_config.json").write_text("{"),
                            "generation_config.json is not valid JSON"),
    "generation_temperature_text": ("gpt2", lambda src, cfg: (src / "generation_config.json").write_text(
        '{"do_sample": true, "temperature": "hot"}'), "generation_config.json's temperature is 'hot', not a number"),
    "generation_do_sample_number": ("gpt2", lambda src, cfg: (src / "generation_config.json").write_text(
        '{"do_sample": 1}'), "generation_config.json's do_sample is 1, not true or false"),
    "generation_top_p_out_of_range": ("gpt2", lambda src, cfg: (src / "generation_config.json").write_text(
        '{"top_p": 1.5}'), "generation_config.json's sampling settings are out of range (top_p must be in (0, 1]"),
    "tiny_context": ("gpt2", lambda src, cfg: cfg.update(n_positions=3), "at least 8 positions"),
    "partial_tokenizer": ("gpt2", _drop("tokenizer.json", "vocab.json"), "has merges.txt but not a whole tokenizer"),
    "no_tokenizer_other_vocab": ("gpt2", lambda src, cfg: [
        cfg.update(vocab_size=1000, bos_token_id=0, eos_token_id=0),
        _drop("tokenizer.json", "vocab.json", "merges.txt", "generation_config.json")(src, cfg)],
                                 "not GPT-2's 50257"),
    "damaged_tokenizer": ("gpt2", lambda src, cfg: (src / "tokenizer.json").write_text("]not json"), "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_AND_TOKENIZER_CASES))
def test_config_and_tokenizer_problems_are_one_sentence_before_any_output(case, tiny_model_dir, tmp_path):
    import shutil

    from edgelm.errors import EdgelmError

    arch, mutate, expected = CONFIG_AND_TOKENIZER_CASES[case]
    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir[arch], src)
    cfg = json.loads((src / "config.json").read_text())
    mutate(src, cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgelmError, match=re.escape(expected)):
        export_model(str(src), tmp_path / "o", validate=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_model_without_tokenizer_files_takes_gpt2s_and_says_so(tiny_model_dir, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir["gpt2"], src)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["eos_token_id"] = [50256]  # one id as a list, as transformers may write it
    (src / "config.json").write_text(json.dumps(cfg))
    manifest = export_model(str(src), tmp_path / "o", validate=False, progress=False)
    assert "GPT-2 tokenizer" in manifest["tokenizer"]["source"] and manifest["tokenizer"]["eos_token_id"] == 50256
    assert "tokenizer.json" in manifest["tokenizer"]["files"]
    plain = export_model(str(tiny_model_dir["gpt2"]), tmp_path / "p", validate=False, progress=False)
    assert plain["tokenizer"]["source"] == "the model folder"


def test_every_end_of_text_id_reaches_the_manifest_generation_config_first(tiny_model_dir, tmp_path):
    # transformers' generate ends on any id of a list, and takes generation_config.json's over config.json's
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir["gpt2"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["eos_token_id"] = [50256, 13, 50256]
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "generation_config.json").unlink(missing_ok=True)
    listed = export_model(str(src), tmp_path / "a", validate=False, progress=False)["tokenizer"]
    assert (listed["eos_token_id"], listed["eos_token_ids"]) == (50256, [50256, 13])
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [198, 50256]}))
    taken = export_model(str(src), tmp_path / "b", validate=False, progress=False)["tokenizer"]
    assert (taken["eos_token_id"], taken["eos_token_ids"]) == (198, [198, 50256])
    assert "generation_config.json" in taken["files"]


@pytest.mark.parametrize("where", ["itself", "its parent", "the current folder", "itself, through a link"])
def test_an_output_that_would_replace_the_input_is_refused(tiny_model_dir, tmp_path, monkeypatch, where):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir["gpt2"], src)
    (tmp_path / "link").symlink_to("m")
    before = sorted(p.name for p in src.iterdir())
    out = {"itself": src, "its parent": tmp_path, "the current folder": tmp_path / "m"}.get(where, src)
    model = {"the current folder": "embedded:gpt2", "itself, through a link": str(tmp_path / "link")}.get(where, str(src))
    monkeypatch.chdir(src if where == "the current folder" else tmp_path)
    with pytest.raises(InputError, match="choose an output folder outside it"):
        export_model(model, out, force=True, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before


def test_an_output_that_is_a_link_is_replaced_and_its_target_left_alone(tiny_model_dir, tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("not the exporter's")
    (tmp_path / "to-target").symlink_to("target")
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(OutputExistsError, match="pass --force"):  # refused up front, not at the final rename
        export_model(str(tiny_model_dir["gpt2"]), tmp_path / "dangling", validate=False, progress=False)
    for link in ("to-target", "dangling"):
        export_model(str(tiny_model_dir["gpt2"]), tmp_path / link, force=True, validate=False, progress=False)
        out = tmp_path / link
        assert out.is_dir() and not out.is_symlink() and (out / "manifest.json").is_file()
    assert (tmp_path / "target" / "keep.txt").read_text() == "not the exporter's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "target", "to-target"]  # no .old-PID left


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_sigterm_leaves_no_output_and_no_temporary_folder(tiny_model_dir, tmp_path, signum):
    import signal
    import time

    signum = getattr(signal, signum)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "edgelm", "export", str(tiny_model_dir["gpt2"]), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the export ended before it could be interrupted"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and "terminated; no output was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_temporary_folder_is_removed_by_the_next(tiny_model_dir, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has ended: its folders were abandoned
    for name in (f".o.tmp-{dead}", f".o.old-{dead}", f".o.tmp-{os.getpid()}x", ".other.tmp-1"):
        (tmp_path / name).mkdir()
    export_model(str(tiny_model_dir["gpt2"]), tmp_path / "o", validate=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".o.tmp-{os.getpid()}x", ".other.tmp-1", "o"]


def test_non_float_buffers_are_ignored_and_local_sources_recorded_whole(tiny_model_dir, tmp_path, monkeypatch):
    """Older GPT-2 files carry uint8 attention-mask buffers beside the weights; a relative folder is
    recorded by its absolute path (bench finds the peers' source by it)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir["gpt2"], src)
    tensors = load_file(src / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.uint8))
    save_file(tensors, src / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    m = export_model("m", tmp_path / "o", progress=False)
    assert m["validation"]["status"] == "passed"
    assert m["model"]["source"] == m["steps"][-1]["source"] == str(src.resolve())


def test_offline_hub_id_fails_with_one_sentence(tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "edgelm", "export", "gpt2", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "could not download 'gpt2'" in r.stderr and "local model folder" in r.stderr


def test_pytorch_bin_checkpoint_exports(tmp_path):
    import torch
    from safetensors.torch import load_file

    src = make_tiny_model("gpt2", tmp_path / "st", seed=3)
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    m = export_model(str(src), tmp_path / "o", progress=False)
    assert m["validation"]["status"] == "passed"


def test_unsupported_config_option_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError):
        export_model(str(make_tiny_model("gpt2", tmp_path / "x", add_cross_attention=True)), tmp_path / "o",
                     progress=False)


def test_embedded_default_exports(tmp_path):
    r = _cli("export", "embedded:gpt-neo", "-o", str(tmp_path / "neo"), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["validation"]["status"] == "passed" and m["model"]["architecture"] == "GPTNeoForCausalLM"


def test_python_api_takes_embedded_names():
    """resolve_model_dir, which export_model and every API that opens a checkpoint use, takes
    embedded:NAME as the CLI does."""
    from edgelm.export.checkpoint import resolve_model_dir
    from edgelm.export.embedded import EMBEDDED_MODELS

    assert resolve_model_dir("embedded:gpt2") == EMBEDDED_MODELS["gpt2"]
    with pytest.raises(InputError, match="no embedded model 'llama'"):
        resolve_model_dir("embedded:llama")


def test_relative_tolerance_rule():
    from edgelm.export.validate import Schedule, compare

    sched = Schedule(np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64), np.zeros((1, 2), np.int64),
                     [(0, 2)], None)
    def ref():  # compare consumes the reference list as it goes
        return [{"logits": np.array([[[100.0, 1.0], [100.0, 1.0]]], np.float32)}]

    got = [{"logits": np.array([[[100.05, 1.0], [100.0, 1.0]]], np.float32)}]
    assert compare(ref(), got, sched, atol=2e-3, rtol=1e-3).largest["logits"] == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(ValidationError, match="logits"):
        compare(ref(), got, sched, atol=2e-3, rtol=0.0)
    small = [{"logits": np.array([[[1.05, 1.0], [1.0, 1.0]]], np.float32)}]
    with pytest.raises(ValidationError):  # 0.05 on a value of 1 is far beyond 2e-3 + 1e-3
        compare([{"logits": np.ones((1, 2, 2), np.float32)}], small, sched, atol=2e-3, rtol=1e-3)
    # ONNX Runtime's outputs come as a generator: one that stops early (or runs on) validates nothing
    for steps in (0, 2):
        with pytest.raises(ValidationError, match=f"got {steps} steps of outputs where the schedule has 1"):
            compare(ref(), iter(got * steps), sched, atol=2e-3, rtol=1e-3)


def test_fp16_graphs_are_held_to_pytorch_fp16s_own_distance_from_fp32():
    """Beyond atol an fp16 output passes only when its largest and its mean |diff| are both within
    2x PyTorch fp16's own: a graph no worse than fp16 arithmetic passes, a wrong one does not."""
    from edgelm.export.validate import Differences, Schedule, compare

    sched = Schedule(np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64), np.zeros((1, 2), np.int64),
                     [(0, 2)], None)
    ref = np.zeros((1, 2, 4), np.float32)
    own = Differences(largest={"logits": 0.5}, mean={"logits": 0.1}, excess={"logits": 10.0})
    fp16_like = ref.copy()
    fp16_like[0, 0, 0] = 0.9  # largest 0.9 <= 2 x 0.5, mean 0.1125 <= 2 x 0.1
    d = compare([{"logits": ref}], [{"logits": fp16_like}], sched, atol=0.05, own=own)
    assert d.largest["logits"] == pytest.approx(0.9) and d.mean["logits"] == pytest.approx(0.1125)
    with pytest.raises(ValidationError, match="exceeds atol 0.05 "):  # fails without the yardstick
        compare([{"logits": ref}], [{"logits": fp16_like}], sched, atol=0.05)
    everywhere = ref + 0.3  # largest 0.3, but the mean 0.3 > 2 x 0.1: off everywhere, not rounding
    with pytest.raises(ValidationError, match="PyTorch fp16: 0.5"):
        compare([{"logits": ref}], [{"logits": everywhere}], sched, atol=0.05, own=own)
    overflowed = Differences(largest={"logits": float("inf")}, mean={"logits": float("inf")}, excess={})
    with pytest.raises(ValidationError):  # PyTorch fp16 overflowing is no yardstick
        compare([{"logits": ref}], [{"logits": fp16_like}], sched, atol=0.05, own=overflowed)


def test_graph_this_machine_cannot_run_is_marked_not_validated(tiny_model_dir, tmp_path, monkeypatch):
    import onnxruntime

    class NoKernels:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for X")

    monkeypatch.setattr(onnxruntime, "InferenceSession", NoKernels)
    m = export_model(str(tiny_model_dir["gpt2"]), tmp_path / "o", dtype="fp16", progress=False)
    assert m["validation"]["status"] == "not_validated"
    assert "cannot run this graph here" in m["validation"]["reason"]


def test_untied_lm_head_exports(tmp_path):
    src = make_tiny_model("gpt2", tmp_path / "untied", seed=5, tie_word_embeddings=False)
    m = export_model(str(src), tmp_path / "o", progress=False)
    assert m["model"]["facts"]["tied_embeddings"] is False and m["validation"]["status"] == "passed"


# -- linear layout: 1x1 Conv (default fp32) and MatMul ---------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_conv_layout_is_the_matmul_graph_in_another_form(tiny_artifact, tiny_model_dir, tmp_path, arch):
    """The default fp32 graph has its projections as 1x1 Conv; turned back, it is the MatMul export."""
    import onnxruntime as ort

    from edgelm.optimize.onnx_edit import conv_to_matmul

    conv = read_manifest(tiny_artifact[arch])
    layers = conv["model"]["facts"]["num_layers"]
    assert conv["graph"]["linear_layout"] == "conv"
    assert conv["graph"]["operators"]["Conv"] == 4 * layers and conv["graph"]["operators"]["MatMul"] == 1  # LM head
    mm = export_model(str(tiny_model_dir[arch]), tmp_path / "mm", progress=False, linear_layout="matmul")
    assert mm["graph"]["linear_layout"] == "matmul" and mm["validation"]["status"] == "passed"
    assert "Conv" not in mm["graph"]["operators"]

    model = onnx.load(str(tiny_artifact[arch] / "model.onnx"))
    assert conv_to_matmul(model) == 4 * layers
    reference = onnx.load(str(tmp_path / "mm" / "model.onnx"))
    assert [(n.op_type, n.name) for n in model.graph.node] == [(n.op_type, n.name) for n in reference.graph.node]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert weights.keys() == expected.keys()
    assert all(np.array_equal(weights[k], expected[k]) for k in expected)

    # and the two graphs compute the same logits (prompt of 5 tokens, batch 2, no cache yet)
    feeds = prompt_feed(conv, np.arange(10, dtype=np.int64).reshape(2, 5) + 3)
    outs = [ort.InferenceSession(str(a / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
            for a in (tiny_artifact[arch], tmp_path / "mm")]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def _nodes(model):
    return [(n.op_type, n.domain, n.name, list(n.input), list(n.output),
             [(a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute]) for n in model.graph.node]


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_layout_is_validated_and_computes_the_matmul_logits(tiny_artifact, tiny_model_dir, tmp_path, arch):
    """--linear-layout packed: every projection and the LM head are edgelm's PackedLinear over one
    packed copy of each weight (the tied table too), attention is its CachedAttention, and the graph
    is validated against PyTorch like any export."""
    import onnxruntime as ort

    from edgelm.runtime import native

    if native.library_path() is None:
        pytest.skip("edgelm's operator library is not built")
    m = export_model(str(tiny_model_dir[arch]), tmp_path / "p", progress=False, linear_layout="packed")
    layers = m["model"]["facts"]["num_layers"]
    assert m["graph"]["linear_layout"] == "packed" and m["validation"]["status"] == "passed"
    assert m["graph"]["operators"]["PackedLinear"] == 4 * layers + 1
    assert m["graph"]["operators"]["CachedAttention"] == layers
    assert m["graph"]["operators"]["PackedEmbedding"] == 1
    # attention takes the mask itself, the lookup is one node: what is left of the graph's small operators
    assert sum(m["graph"]["operators"].values()) == 5 * layers + 7
    assert m["graph"]["operators"]["SkipLayerNormalization"] == 1  # the others run inside the projections after them
    for op in ("MatMul", "Conv", "FastGelu", "GroupQueryAttention"):  # GELU runs inside the MLP's first PackedLinear
        assert op not in m["graph"]["operators"]
    assert m["graph"]["opset"]["ai.edgelm"] == 1
    mm = export_model(str(tiny_model_dir[arch]), tmp_path / "mm", progress=False, linear_layout="matmul")
    assert m["graph"]["weight_bytes"] >= mm["graph"]["weight_bytes"]  # panels pad N up to a multiple of 16
    assert m["graph"]["weight_bytes"] < mm["graph"]["weight_bytes"] * 1.05  # and the table is stored once

    feeds = prompt_feed(m, np.array([[3, 17, 40, 2, 9], [1, 1, 5, 6, 7]], np.int64))
    opts = ort.SessionOptions()
    native.register(opts)
    packed = ort.InferenceSession(str(tmp_path / "p" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(tmp_path / "mm" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(packed.run(["logits"], feeds)[0], plain.run(["logits"], feeds)[0], rtol=1e-4, atol=1e-5)

    # turned back for the quantizers, it is the MatMul export node for node and weight for weight
    from edgelm.optimize.onnx_edit import packed_to_matmul

    model = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert packed_to_matmul(model) == 5 * layers + 2  # the projections, the head, the attention nodes, the lookup
    reference = onnx.load(str(tmp_path / "mm" / "model.onnx"))
    assert [(n.op_type, n.name, list(n.input)) for n in model.graph.node] == \
        [(n.op_type, n.name, list(n.input)) for n in reference.graph.node]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert weights.keys() == expected.keys()
    assert all(np.array_equal(weights[k], expected[k]) for k in expected)
    assert [o.domain for o in model.opset_import] == [o.domain for o in reference.opset_import]
    # a packed export from before PackedEmbedding (its lookup was nine nodes) is refused, not half turned
    from edgelm.errors import UnsupportedModelError

    older = onnx.load(str(tmp_path / "p" / "model.onnx"))
    older.graph.node[0].name = "/model/embed_tokens/GatherLane"
    with pytest.raises(UnsupportedModelError, match="older edgelm .* export it again"):
        packed_to_matmul(older)

    # and the other way, as the runtime loads a default (conv) artifact on edgelm's kernels: the
    # packed export node for node (attributes, order, names) and weight for weight
    from edgelm.optimize.onnx_edit import load_model, matmul_to_packed

    model = load_model(tiny_artifact[arch] / "model.onnx")
    assert matmul_to_packed(model) == 5 * layers + 2
    reference = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert _nodes(model) == _nodes(reference)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert weights.keys() == expected.keys()
    assert all(weights[k].dtype == expected[k].dtype and np.array_equal(weights[k], expected[k]) for k in expected)
    assert [(o.domain, o.version) for o in model.opset_import] == [(o.domain, o.version) for o in reference.opset_import]
    assert model.graph.input == reference.graph.input and model.graph.output == reference.graph.output
    # right padding (no attention bias) has no packed form: refused, not half turned
    right = onnx.load(str(tmp_path / "mm" / "model.onnx"))
    attention = next(n for n in right.graph.node if n.op_type == "GroupQueryAttention")
    attention.input[10] = ""
    with pytest.raises(UnsupportedModelError, match="right padding"):
        matmul_to_packed(right)


def test_packed_layout_with_an_untied_lm_head(tmp_path):
    from edgelm.runtime import native

    if native.library_path() is None:
        pytest.skip("edgelm's operator library is not built")
    src = make_tiny_model("gpt2", tmp_path / "untied", seed=5, tie_word_embeddings=False)
    m = export_model(str(src), tmp_path / "o", progress=False, linear_layout="packed")
    assert m["validation"]["status"] == "passed" and m["graph"]["operators"]["PackedLinear"] == 4 * 2 + 1
    # the default export, turned into the packed graph as the runtime loads it: the same graph, the
    # lookup staying a Gather of the untied table
    from edgelm.optimize.onnx_edit import load_model, matmul_to_packed

    export_model(str(src), tmp_path / "c", progress=False)
    model = load_model(tmp_path / "c" / "model.onnx")
    assert matmul_to_packed(model) == 5 * 2 + 1
    reference = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert _nodes(model) == _nodes(reference)
    assert {t.name for t in model.graph.initializer} == {t.name for t in reference.graph.initializer}


def test_packed_layout_without_the_library_is_refused_up_front(tiny_model_dir, tmp_path, monkeypatch):
    from edgelm.errors import DependencyError
    from edgelm.runtime import native

    monkeypatch.setattr(native, "library_path", lambda: None)
    with pytest.raises(DependencyError, match="operator library is not built.*--linear-layout conv"):
        export_model(str(tiny_model_dir["gpt2"]), tmp_path / "a", linear_layout="packed", progress=False)
    assert not (tmp_path / "a").exists()


def test_conv_layout_needs_fp32_and_the_builder(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="conv linear layout needs --dtype fp32"):
        export_model(str(tiny_model_dir["gpt2"]), tmp_path / "a", dtype="fp16", linear_layout="conv", progress=False)
    with pytest.raises(InputError, match="conv linear layout needs"):
        export_model(str(tiny_model_dir["gpt2"]), tmp_path / "b", backend="optimum", linear_layout="conv",
                     progress=False)
    with pytest.raises(InputError, match="packed linear layout needs --dtype fp32"):
        export_model(str(tiny_model_dir["gpt2"]), tmp_path / "p", dtype="fp16", linear_layout="packed", progress=False)
    with pytest.raises(InputError, match="linear layout 'dense' is not supported"):
        export_model(str(tiny_model_dir["gpt2"]), tmp_path / "c", linear_layout="dense", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "p").exists()
    m = export_model(str(tiny_model_dir["gpt2"]), tmp_path / "h", dtype="fp16", progress=False)
    assert m["graph"]["linear_layout"] == "matmul"  # auto: fp16 graphs are for CUDA


def test_a_damaged_copy_is_found_by_verify_eval_and_bench(tiny_artifact, tmp_path, capsys):
    import shutil

    from edgelm.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact["gpt2"], copy)
    files = read_manifest(copy)["files"]
    biggest = copy / max(files, key=lambda name: files[name]["bytes"])
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte: same size, different weights
    biggest.write_bytes(bytes(data))
    (tmp_path / "t.txt").write_text("It was a truth universally acknowledged. " * 20)

    assert main(["verify", str(tiny_artifact["gpt2"])]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    for args in (["verify", str(copy)], ["eval", str(copy), "--text", str(tmp_path / "t.txt")], ["bench", str(copy)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{biggest} does not match its sha256" in err, err


MANIFEST_DAMAGE = {  # case: (change to a copy of the artifact's manifest and folder, expected words)
    "a list": (None, "not a JSON object"),  # the whole manifest inside a list
    "text schema version": (lambda m, folder: m.update(schema_version="2"), "schema_version is '2', not a whole number"),
    "files as a list": (lambda m, folder: m.update(files=list(m["files"])), "files is not a JSON object"),
    "io as text": (lambda m, folder: m.update(io="inputs"), "io is not a JSON object"),
    "io without kv_dtype": (lambda m, folder: m["io"].pop("kv_dtype"), "its io lacks kv_dtype (float32 or float16), inputs"),
    "cache of unknown kind": (lambda m, folder: m["io"]["kv_cache"][0].update(kind="ring"),
                              "its io.kv_cache is not a list of {kind, past_key"),
    "cache without a name": (lambda m, folder: m["io"]["kv_cache"][1].pop("present_value"),
                             "its io.kv_cache is not a list of {kind, past_key"),
    "eos as a list": (lambda m, folder: m["tokenizer"].update(eos_token_id=[50256, 1]),
                      "bos_token_id or eos_token_id is not one token id"),
    "eos ids as text": (lambda m, folder: m["tokenizer"].update(eos_token_ids="50256"),
                        "its tokenizer's eos_token_ids is not a list of token ids"),
    "no facts": (lambda m, folder: m["model"].pop("facts"), "its model.facts lacks whole numbers num_layers"),
    "context as text": (lambda m, folder: m["model"]["facts"].update(max_positions="abc"),
                        "its model.facts lacks whole numbers"),
    "unknown kv dtype": (lambda m, folder: m["io"].update(kv_dtype="bogus"), "its io lacks kv_dtype (float32 or float16)"),
    "input without a name": (lambda m, folder: m["io"].update(inputs=[{}]), "io.inputs or io.outputs has an entry without"),
    "no cache": (lambda m, folder: m["io"].update(kv_cache=[]), "its io.kv_cache lists no layer"),
    "bos outside the vocabulary": (lambda m, folder: m["tokenizer"].update(bos_token_id=10 ** 9),
                                   "outside the model's vocabulary of 50257"),
    "vocabulary smaller than its ids": (lambda m, folder: m["model"]["facts"].update(vocab_size=10),
                                        "outside the model's vocabulary of 10"),
    "file without bytes": (lambda m, folder: m["files"]["model.onnx"].pop("bytes"),
                           "files entry 'model.onnx' is not a file name with bytes and sha256"),
    "file outside the folder": (lambda m, folder: m["files"].update({"../x": m["files"]["model.onnx"]}),
                                "files entry '../x' is not a file name"),
    "graph without file": (lambda m, folder: m["graph"].pop("file"), "the graph's file None is not among its files"),
    "graph file unlisted and gone": (lambda m, folder: [m["files"].pop("model.onnx"), (folder / "model.onnx").unlink()],
                                     "the graph's file 'model.onnx' is not among its files"),
    "external data unlisted": (lambda m, folder: m["graph"].update(external_data="model.onnx.data"),
                               "the graph's file 'model.onnx.data' is not among its files"),
    "generation not an object": (lambda m, folder: m.update(generation=[]), "its generation is not a JSON object"),
    "generation top_k as text": (lambda m, folder: m.update(generation={"top_k": "40"}),
                                 "its generation's top_k is '40', not a whole number"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_one_sentence(case, tiny_artifact, tmp_path, capsys):
    import shutil

    from edgelm.cli import main
    from edgelm.errors import ArtifactError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact["gpt2"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change, expected = MANIFEST_DAMAGE[case]
    if change is None:
        manifest = [manifest]
    else:
        change(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("edgelm verify: error: ") and "is damaged or not an edgelm manifest" in err
    assert expected in err and err.endswith("export the model again"), err
    with pytest.raises(ArtifactError, match=re.escape(expected)):
        read_manifest(copy)


@pytest.mark.parametrize("where", ["in the output", "elsewhere"])
def test_a_full_disk_is_one_sentence_and_leaves_nothing(where, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    from edgelm.cli import main

    def disk_full(src, dst, *args, **kwargs):
        open(dst, "wb").write(b"half a file")  # the write that filled the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    def over_quota(model):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    if where == "in the output":  # copying the tokenizer into the temporary output folder
        monkeypatch.setattr(shutil, "copyfile", disk_full)
    else:  # before any output folder, as a download into a full cache would
        monkeypatch.setattr("edgelm.export.pipeline.resolve_model_dir", over_quota)
    out = tmp_path / "o"
    assert main(["export", str(tiny_model_dir["gpt2"]), "-o", str(out), "--no-validate"]) == 2
    device = f"the device holding {tmp_path}" if where == "in the output" else "a device this command writes to"
    err = capsys.readouterr().err.strip()
    assert err == f"edgelm export: error: no space left on {device}; free space or choose another location with -o"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


EMBEDDING_CASES = {  # the tiny GPT-2: 50257 tokens (its tokenizer's: a smaller vocab_size is refused earlier),
    # 128 positions, 32 wide; bos/eos (50256) stay inside the larger vocabulary
    "positions": (dict(n_positions=256), "the checkpoint's wpe.weight is [128, 32] where config.json implies "
                                         "[256, 32] (n_positions 256, n_embd 32); correct config.json"),
    "vocabulary": (dict(vocab_size=50304), "the checkpoint's wte.weight is [50257, 32] where config.json implies "
                                           "[50304, 32] (vocab_size 50304, n_embd 32); correct config.json"),
    "untied lm_head": (None, "the checkpoint's lm_head.weight is [50000, 32] where config.json implies "
                             "[50257, 32] (vocab_size 50257, n_embd 32); correct config.json"),
}


@pytest.mark.parametrize("case", sorted(EMBEDDING_CASES))
def test_embeddings_that_disagree_with_config_are_refused(case, tiny_model_dir, tmp_path):
    import shutil

    change, expected = EMBEDDING_CASES[case]
    src = tmp_path / "m"
    if change is None:  # an untied model whose lm_head has fewer rows than config.json's vocabulary
        from safetensors.numpy import load_file, save_file

        make_tiny_model("gpt2", src, tie_word_embeddings=False)
        weights = load_file(src / "model.safetensors")
        weights["lm_head.weight"] = weights["lm_head.weight"][:50000]
        save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    else:
        shutil.copytree(tiny_model_dir["gpt2"], src)
        cfg = {**json.loads((src / "config.json").read_text()), **change}
        (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=re.escape(expected)):
        export_model(str(src), tmp_path / "o", validate=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_the_validation_spill_lives_in_the_outputs_temporary_folder(tiny_model_dir, tmp_path, monkeypatch):
    """So a full disk names the output's device, and a killed export's spill goes with its temporary folder."""
    import edgelm.export.validate as V

    spills, real = [], V.torch_reference

    def recording(*args, spill_to=None, **kwargs):
        spills.append(spill_to)
        return real(*args, spill_to=spill_to, **kwargs)

    monkeypatch.setattr(V, "torch_reference", recording)
    export_model(str(tiny_model_dir["gpt2"]), tmp_path / "o", progress=False)
    assert spills and all(s.parent.parent.name.startswith(".o.tmp-") for s in spills), spills
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.name.startswith(".")) == []
