"""Distillation, structured pruning and recipes (issue 5), on tiny models and the embedded trained ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures import make_planted_model, make_tiny_model

torch = pytest.importorskip("torch")

from edgelm.optimize.distill import choose_layers, distill_model, parse_layers  # noqa: E402
from edgelm.optimize.models import build_model, load_model  # noqa: E402
from edgelm.optimize.prune import (PruneConfig, UnitMasks, choose_units,  # noqa: E402
                                   pruned_tensors, select_units)
from edgelm.optimize.train import TrainConfig, batch_at, distillation_loss, token_ids  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "edgelm" / "assets" / "text"
TRAIN = TEXT / "calibration.txt"
WIDE = {"gpt2": dict(n_head=4, n_embd=64, n_layer=3), "gpt_neo": dict(num_heads=4, hidden_size=64, num_layers=4,
        attention_types=[[["global", "local"], 2]], attention_layers=["global", "local"] * 2)}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """4 heads per layer (head size 16) so that a quarter of the heads can go; weights scaled so logits vary."""
    root = tmp_path_factory.mktemp("wide")
    return {arch: make_tiny_model(arch, root / arch, seed=1, initializer_range=0.2, **WIDE[arch]) for arch in WIDE}


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    """The first 12,000 characters of the held-out text (about 2,700 tokens): the commands score
    perplexity several times per run, and the whole text would make each score take seconds."""
    path = tmp_path_factory.mktemp("eval") / "heldout-start.txt"
    path.write_text((TEXT / "heldout.txt").read_text()[:12000])
    return path


def _tokens(n: int = 4000) -> np.ndarray:
    from edgelm.optimize.models import tokenizer_for, model_dir_of

    return token_ids(tokenizer_for(model_dir_of("embedded:gpt2")), TRAIN.read_text(), 64)[:n]


# -- student layer choice ----------------------------------------------------------------------------
def test_student_layers_spread_over_depth_and_keep_both_gpt_neo_kinds():
    assert choose_layers(["global"] * 12, ["global"] * 6) == [0, 2, 4, 7, 9, 11]
    neo = ["global", "local"] * 12
    chosen = parse_layers("12", neo)
    assert [neo[i] for i in chosen] == ["global", "local"] * 6  # every-other-layer would keep one kind only
    assert chosen[0] == 0 and chosen[-1] == 23 and chosen == sorted(set(chosen))
    assert parse_layers("0,3", ["global", "local"] * 2) == [0, 3]
    for bad in ("0", "5", "3,1", "a"):
        with pytest.raises(Exception, match="--student-layers"):
            parse_layers(bad, ["global", "local"] * 2)


# -- pruning -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_pruned_shapes_and_outputs_equal_the_masked_original(wide_models, arch):
    model, config = load_model(wide_models[arch])
    layers = len(model.transformer.h)
    rng = np.random.default_rng(0)
    keep_heads = select_units([rng.random(4) for _ in range(layers)], 0.25, "global")
    keep_neurons = select_units([rng.random(256) for _ in range(layers)], 0.30, "global", minimum=8, multiple=8)
    new_config, tensors = pruned_tensors(model, config, keep_heads, keep_neurons)
    pruned = build_model(new_config, tensors)
    assert sum(new_config["edgelm_layer_heads"]) == 4 * layers - round(0.25 * 4 * layers)
    assert all(m % 8 == 0 for m in new_config["edgelm_layer_inner"])
    for i, block in enumerate(pruned.transformer.h):
        n, m = new_config["edgelm_layer_heads"][i], new_config["edgelm_layer_inner"][i]
        shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
        if arch == "gpt2":
            assert shapes["attn.c_attn.weight"] == (64, 3 * 16 * n) and shapes["attn.c_proj.weight"] == (16 * n, 64)
            assert shapes["mlp.c_fc.weight"] == (64, m) and shapes["mlp.c_proj.weight"] == (m, 64)
        else:
            assert shapes["attn.attention.q_proj.weight"] == (16 * n, 64)
            assert shapes["attn.attention.out_proj.weight"] == (64, 16 * n)
            assert shapes["mlp.c_fc.weight"] == (m, 64) and shapes["mlp.c_proj.weight"] == (64, m)
    ids = torch.randint(0, 50257, (2, 24))
    masks = UnitMasks(model, config)
    for i in range(layers):
        masks.heads[i].zero_()[torch.as_tensor(keep_heads[i])] = 1.0
        masks.neurons[i].zero_()[torch.as_tensor(keep_neurons[i])] = 1.0
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        masks.remove()
        full = model(input_ids=ids).logits
        small = pruned(input_ids=ids).logits
    assert not torch.allclose(masked, full, atol=1e-3)  # the masks did remove something
    torch.testing.assert_close(small, masked, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_importance_finds_the_units_that_matter_least_and_loses_less_than_random(tmp_path, arch):
    """A model with planted near-silent heads and neurons: gradient importance removes exactly those, and
    the pruned model's outputs move less than after removing the same number of units at random."""
    weak_heads = {0: [1], 1: [3], 2: [0]}
    weak_neurons = {i: list(range(5 * i, 5 * i + 200, 3))[:64] for i in range(3)}  # 64 of 256 per layer
    folder = make_planted_model(arch, tmp_path / arch, weak_heads, weak_neurons, seed=2, initializer_range=0.2,
                                **{**WIDE[arch], **({"n_layer": 3} if arch == "gpt2" else
                                                    {"num_layers": 3, "attention_layers": ["global", "local", "global"],
                                                     "attention_types": [[["global", "local", "global"], 1]]})})
    model, config = load_model(folder)
    ids = _tokens(6000)
    cfg = PruneConfig(heads=0.25, mlp=0.25, rounds=2, batches=4, batch_size=4, seq_len=32)
    keep_heads, keep_neurons = choose_units(model, config, ids, cfg)
    for i in range(3):
        assert sorted(set(range(4)) - set(keep_heads[i].tolist())) == weak_heads[i]
        assert sorted(set(range(256)) - set(keep_neurons[i].tolist())) == weak_neurons[i]

    probe = torch.from_numpy(ids[:256].reshape(4, 64))
    with torch.no_grad():
        reference = model(input_ids=probe).logits

    def change(keep) -> float:  # how far the pruned model's logits move (the random models' loss means nothing)
        new_config, tensors = pruned_tensors(model, config, *keep)
        with torch.no_grad():
            return float((build_model(new_config, tensors)(input_ids=probe).logits - reference).pow(2).mean())

    by_gradient = change((keep_heads, keep_neurons))
    at_random = [change(choose_units(model, config, ids, PruneConfig(heads=0.25, mlp=0.25, importance="random",
                                                                     seed=s))) for s in range(3)]
    assert by_gradient < 0.1 * min(at_random), (by_gradient, at_random)


def test_prune_command_writes_a_smaller_model_that_exports_with_its_lineage(wide_models, eval_text, tmp_path, capsys):
    from edgelm.cli import main
    from edgelm.export import export_model

    out = tmp_path / "pruned"
    rc = main(["optimize", "prune", str(wide_models["gpt_neo"]), "--heads", "0.25", "--mlp", "0.30",
               "--train-text", str(TRAIN), "-o", str(out), "--recover-steps", "3", "--batch-size", "2",
               "--seq-len", "32", "--score-batches", "2", "--eval-text", str(eval_text), "--quiet", "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    assert record["layer_heads"]["after"] == [3, 3, 3, 3] and record["weight_bytes"]["after"] < record["weight_bytes"]["before"]
    assert record["recovery"]["steps_done"] == 3 and record["energy"]
    assert not (tmp_path / "pruned.ckpt").exists()
    manifest = export_model(str(out), tmp_path / "onnx", progress=False)
    assert manifest["validation"]["status"] == "passed"
    assert [s["name"] for s in manifest["steps"]] == ["prune", "export"]
    assert [e["heads"] for e in manifest["io"]["kv_cache"]] == record["layer_heads"]["after"]


@pytest.mark.parametrize("args,expected", [(["--heads", "1.2"], "--heads"), (["--heads", "0.25", "--seed", "-1"], "--seed"),
                                           (["--mlp", "0.5", "--multiple", "256"], "--multiple 256 is not below the MLP width"),
                                           (["--heads", "0.25", "--batch-size", "10000000"], "lower --batch-size or --seq-len"),
                                           (["--heads", "0.25", "--lr", "1e-3", "--checkpoint-dir", "c"],
                                            "--lr, --checkpoint-dir set the recovery training, which runs only with "
                                            "--recover-steps N"),
                                           (["--heads", "0.25", "--importance", "random", "--score-batches", "4"],
                                            "--importance random scores nothing, so --score-batches would be ignored")])
def test_prune_refuses_bad_settings_in_one_line(wide_models, tmp_path, capsys, args, expected):
    from edgelm.cli import main

    rc = main(["optimize", "prune", str(wide_models["gpt2"]), *args, "--train-text", str(TRAIN),
               "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and expected in err and not (tmp_path / "x").exists()


# -- distillation ------------------------------------------------------------------------------------
def test_distillation_loss_falls_on_a_held_out_batch():
    from edgelm.optimize.distill import make_student
    from edgelm.optimize.models import model_dir_of
    from edgelm.optimize.train import train

    teacher, config = load_model(model_dir_of("embedded:gpt2"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, _, layers = make_student(teacher, config, "2")
    assert layers == [0, 3] and len(student.transformer.h) == 2
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=64, lr=5e-4, warmup_steps=2, precision="fp32")
    ids = _tokens(8000)
    probe = torch.from_numpy(batch_at(ids[6000:], 0, TrainConfig(steps=1, batch_size=4, seq_len=64, seed=99)))

    def probe_loss() -> float:
        with torch.no_grad():
            loss, _, _ = distillation_loss(student(input_ids=probe[:, :-1]).logits,
                                           teacher(input_ids=probe[:, :-1]).logits, probe[:, 1:], cfg)
        return float(loss)

    before = probe_loss()
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        result = train(student, teacher, ids[:6000], cfg, Path(work), progress=False)
    after = probe_loss()
    assert result.steps == 8 and after < before - 0.05, (before, after)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_terms(temperature):
    cfg = TrainConfig(steps=1, temperature=temperature, alpha=0.5)
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    y = torch.randint(0, 11, (2, 3))
    loss, soft, ce = distillation_loss(s, t, y, cfg)
    ref_ce = torch.nn.functional.cross_entropy(s.reshape(-1, 11), y.reshape(-1))
    torch.testing.assert_close(ce, ref_ce)
    log_s = torch.log_softmax(s / temperature, -1).reshape(-1, 11)
    p_t = torch.softmax(t / temperature, -1).reshape(-1, 11)
    expect_soft = -(p_t * log_s).sum(-1).mean() if temperature == 1.0 else \
        (p_t * (p_t.log() - log_s)).sum(-1).mean() * temperature ** 2
    torch.testing.assert_close(soft, expect_soft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, 0.5 * expect_soft + 0.5 * ref_ce, atol=1e-5, rtol=1e-5)
    same, _, _ = distillation_loss(t, t, y, TrainConfig(steps=1, temperature=temperature, alpha=1.0))
    if temperature != 1.0:
        assert float(same) == pytest.approx(0.0, abs=1e-5)  # KL of a distribution with itself


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_interrupted_and_resumed_distillation_ends_with_the_same_weights(wide_models, eval_text, tmp_path, arch):
    from safetensors.torch import load_file

    from edgelm.optimize.train import Interrupted

    def run(out: Path, stop_after=None, resume=False):
        cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, checkpoint_every=2, precision="fp32", warmup_steps=2)
        return distill_model(str(wide_models[arch]), out, TRAIN, cfg, student_layers="2", progress=False,
                             eval_text=eval_text, resume=resume, stop_after=stop_after)

    straight = run(tmp_path / "straight")
    with pytest.raises(Interrupted, match="--resume|checkpoint"):
        run(tmp_path / "resumed", stop_after=3)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.ckpt" / "state.pt").is_file()
    with pytest.raises(Exception, match="--resume"):
        run(tmp_path / "resumed")  # a checkpoint is there: refuse to silently start over
    with pytest.raises(Exception, match="holds no checkpoint"):
        run(tmp_path / "fresh", resume=True)
    assert not (tmp_path / "fresh.ckpt").exists()  # a failed resume leaves no empty checkpoint folder
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed["training"]["resumed_from"] == 3 and resumed["training"]["steps_done"] == 6
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert straight["student_layer_kinds"] == (["global", "global"] if arch == "gpt2" else ["global", "local"])


def test_distill_command_output_loads_exports_and_records_perplexity(wide_models, eval_text, tmp_path, capsys):
    from edgelm.cli import main
    from edgelm.export import export_model

    out = tmp_path / "student"
    rc = main(["optimize", "distill", "--teacher", str(wide_models["gpt_neo"]), "--student-layers", "2",
               "--train-text", str(TRAIN), "-o", str(out), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
               "--eval-text", str(eval_text), "--quiet", "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    assert record["student_layer_kinds"] == ["global", "local"]
    assert {"teacher", "student_before", "student_after"} <= set(record["perplexity"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_layers"] == 2 and config["attention_layers"] == ["global", "local"]
    manifest = export_model(str(out), tmp_path / "onnx", progress=False)
    assert manifest["validation"]["status"] == "passed" and manifest["steps"][0]["name"] == "distill"


def test_distill_needs_a_length_and_a_student(tmp_path, capsys):
    from edgelm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["optimize", "distill", "--teacher", "embedded:gpt2", "--student-layers", "2", "--train-text",
              str(TRAIN), "-o", str(tmp_path / "s")])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["teacher as checkpoint folder", "folder of other files", "negative seed",
                                  "infinite lr", "diverging lr", "student context longer", "batch past memory",
                                  "student config a list", "checkpoint folder that cannot be made",
                                  "student context under the sequence", "evaluation text too short"])
def test_distill_refuses_what_would_lose_data_or_write_nan(wide_models, tmp_path, capsys, case):
    import shutil

    from edgelm.cli import main

    teacher = tmp_path / "teacher"
    shutil.copytree(wide_models["gpt2"], teacher)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a checkpoint")
    config = json.loads((teacher / "config.json").read_text())
    (tmp_path / "long.json").write_text(json.dumps({**config, "n_layer": 1, "n_positions": 256}))
    extra, expected = {
        "teacher as checkpoint folder": (["--checkpoint-dir", str(teacher)], "is or holds the input"),
        "folder of other files": (["--checkpoint-dir", str(tmp_path / "mine")], "holds files but no checkpoint"),
        "negative seed": (["--seed", "-1"], "--seed must be a whole number >= 0"),
        "infinite lr": (["--lr", "inf"], "--lr must be a positive number"),
        "diverging lr": (["--lr", "1e30"], "training diverged at step"),
        "student context longer": (["--student-config", str(tmp_path / "long.json")], "longer than the teacher's 128"),
        "batch past memory": (["--batch-size", "10000000"], "of memory free; lower --batch-size or --seq-len"),
        "student config a list": (["--student-config", str(tmp_path / "list.json")], "holds a JSON list, not an object"),
        "checkpoint folder that cannot be made": (["--checkpoint-dir", "/proc/edgelm-ckpt"],
                                                  "(/proc/edgelm-ckpt); check the paths and folders given"),
        "student context under the sequence": (["--student-config", str(tmp_path / "short.json")],
                                               "--seq-len 16 is longer than the student's context (8)"),
        "evaluation text too short": (["--eval-text", str(tmp_path / "one.txt")],
                                      "the --eval-text text has 1 tokens, fewer than the 3 a score needs"),
    }[case]
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "short.json").write_text(json.dumps({**config, "n_layer": 1, "n_positions": 8}))
    (tmp_path / "one.txt").write_text("Hello")
    student = [] if "--student-config" in extra else ["--student-layers", "1"]
    rc = main(["optimize", "distill", "--teacher", str(teacher), *student, "--train-text", str(TRAIN),
               "-o", str(tmp_path / "out"), "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists() and (teacher / "config.json").is_file()
    assert (tmp_path / "mine" / "notes.txt").is_file()


def test_a_training_length_must_be_finite():
    import math

    from edgelm.errors import InputError
    from edgelm.optimize.train import TrainConfig

    for minutes in (math.inf, math.nan, 0):
        with pytest.raises(InputError, match="--minutes must be a positive number"):
            TrainConfig(minutes=minutes)


def test_a_student_with_a_shorter_context_takes_the_teachers_first_positions(wide_models, tmp_path):
    from edgelm.optimize.distill import make_student
    from edgelm.optimize.models import load_model

    teacher, config = load_model(wide_models["gpt2"])
    (tmp_path / "student.json").write_text(json.dumps({**config, "n_layer": 2, "n_positions": 64}))
    student, student_config, layers = make_student(teacher, config, student_config_file=tmp_path / "student.json")
    assert layers is not None and student.transformer.wpe.weight.shape[0] == 64
    assert np.array_equal(student.transformer.wpe.weight.detach().numpy(),
                          teacher.transformer.wpe.weight.detach().numpy()[:64])


# -- recipes -----------------------------------------------------------------------------------------
def test_recipe_runs_end_to_end_with_report_and_lineage(wide_models, eval_text, tmp_path):
    from edgelm.optimize.recipe import run_recipe

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
model = "{wide_models['gpt2']}"
train_text = "{TRAIN}"
eval_text = "{eval_text}"
eval_length = 64
new_tokens = 8
repeats = 1

[[step]]
kind = "distill"
student_layers = 2
steps = 2
batch_size = 2
seq_len = 32

[[step]]
kind = "prune"
heads = 0.25
mlp = 0.30
recover_steps = 2
batch_size = 2
seq_len = 32
score_batches = 2

[[step]]
kind = "export"
linear_layout = "matmul"

[[step]]
kind = "quantize"
mode = "int8-weight"
max_ppl_increase = "50%"
""")
    report = run_recipe(recipe, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert [r["stage"] for r in report["rows"]] == ["source", "01-distill", "02-prune", "03-export", "04-quantize"]
    for r in report["rows"]:
        assert r["model_bytes"] > 0 and r["decode_tokens_per_s"] > 0 and r["perplexity"] > 1
    sizes = [r["model_bytes"] for r in report["rows"]]
    assert sizes[0] > sizes[1] > sizes[2] and sizes[4] < 0.6 * sizes[3]
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["distill", "prune", "export", "quantize"]
    assert ".recipe-run" not in json.dumps(manifest["steps"])  # the lineage names folders that exist
    assert Path(manifest["steps"][-1]["source"]) == out / "steps" / "03-export"
    assert manifest["recipe"]["report"][-1]["stage"] == "04-quantize"
    export = json.loads((out / "steps" / "03-export" / "manifest.json").read_text())
    assert export["graph"]["linear_layout"] == "matmul"  # the recipe's setting, not the fp32 default (conv)
    assert (out / "report.md").read_text().count("\n| ") >= 6 and (out / "report.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".out.recipe-run*")) and not (out / "state.json").exists()
    # every stage's artifact is where the report, the manifest and report.json say it is
    written = json.loads((out / "report.json").read_text())["rows"]
    for rows in (report["rows"], manifest["recipe"]["report"], written):
        assert [Path(r["artifact"]) for r in rows][-1] == out / "model"
        assert all((Path(r["artifact"]) / "manifest.json").is_file() for r in rows), [r["artifact"] for r in rows]


def test_recipe_problems_are_refused_before_any_work(tmp_path):
    """A window past the model's context is refused before the work folder exists; a work folder
    left without a state (interrupted before its first record) does not block the next run; a
    checkpoint folder inside the output is refused (it is deleted once the output is written)."""
    from edgelm.errors import InputError
    from edgelm.optimize.recipe import _Run, load_recipe, run_recipe
    from edgelm.optimize.train import checkpoint_folder

    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "embedded:gpt2"\neval_length = 600\n[[step]]\nkind = "export"\n')
    with pytest.raises(InputError, match="eval_length 600 is longer than the model's context of 512"):
        run_recipe(recipe, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]
    stale = tmp_path / ".out.recipe-run"
    (stale / "steps").mkdir(parents=True)
    run = _Run(stale, load_recipe(recipe), resume=False)
    assert run.state["done"] == {} and (stale / "state.json").is_file()
    for ckpt in (tmp_path / "o", tmp_path / "o" / "ckpt", tmp_path):
        with pytest.raises(InputError, match="must be apart"):
            checkpoint_folder(tmp_path / "o", ckpt, resume=False)
    killed = tmp_path / "killed.ckpt"  # killed while writing its first checkpoint: still a checkpoint folder
    killed.mkdir()
    (killed / "state.pt.tmp-123").write_bytes(b"half")
    assert checkpoint_folder(tmp_path / "o", killed, resume=False) == killed
    for damaged in ("{", "{}", "[]"):  # a record of the unfinished run that cannot be read
        (stale / "state.json").write_text(damaged)
        with pytest.raises(InputError, match="state.json is damaged; run without --resume and with --force"):
            _Run(stale, load_recipe(recipe), resume=True)
    recipe.write_bytes(b'model = "embedded:gpt2"  # caf\xe9\n')
    with pytest.raises(InputError, match="is not UTF-8 text .byte 30.; save the recipe as UTF-8"):
        load_recipe(recipe)
    recipe.write_text('model = "embedded:gpt2"\nnew_tokens = 500\n[[step]]\nkind = "export"\n')
    with pytest.raises(InputError, match="new_tokens 500 after the 32-token prompt pass the model's context of 512"):
        run_recipe(recipe, tmp_path / "out", progress=False)
    # a run left unfinished: --resume continues it, --force starts over (it used to refuse both ways)
    recipe.write_text('model = "embedded:gpt2"\n[[step]]\nkind = "export"\n')
    with pytest.raises(InputError, match="pass --resume to continue it, or --force to start over"):
        _Run(stale, load_recipe(recipe), resume=False)
    (stale / "steps" / "left-over").mkdir()
    fresh = _Run(stale, load_recipe(recipe), resume=False, force=True)
    assert fresh.state["done"] == {} and not (stale / "steps" / "left-over").exists()


def test_a_recipe_step_killed_before_its_first_checkpoint_starts_again_on_resume(wide_models, tmp_path, monkeypatch):
    import edgelm.optimize.distill as distill
    from edgelm.optimize.recipe import run_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{wide_models["gpt2"]}"\ntrain_text = "{TRAIN}"\neval_length = 32\nrepeats = 1\n'
                      'new_tokens = 4\n[[step]]\nkind = "distill"\nstudent_layers = "1"\nsteps = 2\n'
                      'batch_size = 2\nseq_len = 16\n')
    calls = []
    real = distill.distill_model

    def killed_once(*args, **kwargs):
        calls.append(kwargs["resume"])
        if len(calls) == 1:  # as if killed after making the checkpoint folder, before writing a checkpoint
            kwargs["checkpoint_dir"].mkdir(parents=True)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "distill_model", killed_once)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "out", progress=False)
    run_recipe(recipe, tmp_path / "out", resume=True, progress=False)
    assert calls == [False, False] and (tmp_path / "out" / "report.json").is_file()


def test_a_recipe_with_force_keeps_its_step_inputs(tmp_path):
    from edgelm.errors import InputError
    from edgelm.optimize.recipe import run_recipe

    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text(TRAIN.read_text()[:4000])
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "embedded:gpt2"\n[[step]]\nkind = "export"\n[[step]]\nkind = "quantize"\n'
                      'mode = "int8-static"\ncalib_text = "data/calib.txt"\n')
    with pytest.raises(InputError, match="is or holds the input"):
        run_recipe(recipe, data, force=True, progress=False)
    assert (data / "calib.txt").is_file()


def test_recipe_errors_name_the_step_and_key(tmp_path):
    from edgelm.errors import InputError
    from edgelm.optimize.recipe import load_recipe

    cases = {
        'model = "embedded:gpt2"\n[[step]]\nkind = "prune"\nhedas = 0.2\n': "step 1 (prune) has no setting(s) hedas",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\n[[step]]\nkind = "distill"\n': "PyTorch steps must come first",
        'model = "embedded:gpt2"\n[[step]]\nkind = "squash"\n': "step 1 has kind 'squash'",
        'model = "embedded:gpt2"\n': "no [[step]]",
        'model = \n': "not valid TOML",
        'model = "embedded:gpt2"\nstep = [1, 2]\n': "step 1 is 1, not a table",
        'model = "embedded:gpt2"\neval_length = "abc"\n[[step]]\nkind = "export"\n': "eval_length must be a whole number",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\n[[step]]\nkind = "quantize"\nsmooth_alpha = "x"\n':
            "step 2 (quantize): smooth_alpha must be a number",
        'model = "embedded:gpt2"\ntrain_text = "t.txt"\n[[step]]\nkind = "distill"\nsteps = "10"\n':
            "step 1 (distill): steps must be a whole number",
        'model = "embedded:gpt2"\ntrain_text = "t.txt"\n[[step]]\nkind = "distill"\nsteps = 0\n':
            "step 1 (distill): --steps must be at least 1",
        'model = "embedded:gpt2"\ntrain_text = "t.txt"\n[[step]]\nkind = "prune"\nheads = 0.2\nsteps = 1\n':
            "step 1 (prune) has no setting(s) steps",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\ndtype = "fp16"\n[[step]]\nkind = "quantize"\n':
            "quantization takes fp32",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\n[[step]]\nkind = "quantize"\n[[step]]\nkind = "quantize"\n':
            "step 3 quantizes a model that an earlier step quantized",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\n[[step]]\nkind = "quantize"\nmode = "int8-weight"\n'
        'calib_text = "c.txt"\n': "step 2 (quantize): int8-weight calibrates nothing",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\n[[step]]\nkind = "quantize"\nmode = "auto"\n'
        'target = "arm64"\n': "step 2 (quantize): --mode auto measures speed, so it must run on the target machine",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\n[[step]]\nkind = "quantize"\nmode = "int8-dynamic"\n'
        'block_size = 64\n': "step 2 (quantize): int8-dynamic does not use --block-size (block_size in a recipe)",
        'model = "embedded:gpt2"\ntrain_text = "t.txt"\n[[step]]\nkind = "prune"\nheads = 0.2\nimportance = "random"\n'
        'rounds = 2\n': "step 1 (prune): --importance random scores nothing, so --rounds would be ignored",
        'model = "embedded:gpt2"\ntrain_text = "t.txt"\n[[step]]\nkind = "prune"\nheads = 0.2\nalpha = 0.9\n':
            "step 1 (prune): alpha set the recovery training, which runs only with recover_steps = N",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\nlinear_layout = "convv"\n':
            "step 1 (export): linear layout 'convv' is not supported; choose auto, matmul, conv, packed",
    }
    for text, message in cases.items():
        path = tmp_path / "r.toml"
        path.write_text(text)
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_recipe(path)


def test_recipe_step_inputs_are_checked_before_the_run_starts(tmp_path, monkeypatch):
    """What a step would refuse only once running (a missing or short text, layers the model no longer
    has after an earlier distill, a window past the context, a NaN tolerance) is refused before the work
    folder exists, in the recipe's own words; an input error inside the first step leaves no work folder
    that the next run would have to --force away."""
    import edgelm.optimize.distill as distill
    from edgelm.errors import InputError
    from edgelm.optimize.recipe import run_recipe

    (tmp_path / "short.txt").write_text("Hi")
    top = f'model = "embedded:gpt2"\ntrain_text = "{TRAIN}"\n'
    distill_1 = '[[step]]\nkind = "distill"\nstudent_layers = 1\nsteps = 1\n'
    quantize = '[[step]]\nkind = "export"\n[[step]]\nkind = "quantize"\nmode = "int8-static"\n'
    cases = {
        top.replace(str(TRAIN), "missing.txt") + distill_1: "no text file .*missing.txt; pass a UTF-8 text file "
                                                            "with train_text in the recipe",
        top + 'eval_text = "short.txt"\n' + distill_1: "eval_text has 1 tokens, too few to score",
        top + distill_1.replace("1\nsteps", '"1,x"\nsteps'): r"step 1 \(distill\): student_layers takes a number of "
                                                             "layers or a list",
        top + distill_1 + distill_1.replace("= 1\nsteps", "= 3\nsteps"): r"step 2 \(distill\): student_layers must "
                                                                         r"be from 1 to 1 \(the teacher's depth\)",
        top + distill_1.replace("student_layers = 1", 'student_config = "none.json"'): r"step 1 \(distill\): no "
                                                                                       "student config",
        top + distill_1 + '[[step]]\nkind = "prune"\nheads = 0.2\nseq_len = 600\n':
            r"step 2 \(prune\): seq_len 600 is longer than the model's context of 512",
        top.replace(str(TRAIN), "short.txt") + '[[step]]\nkind = "prune"\nheads = 0.2\n':
            r"step 1 \(prune\): train_text has 1 tokens, fewer than one sequence of 129",
        'model = "embedded:gpt2"\n[[step]]\nkind = "export"\natol = nan\n':
            r"step 1 \(export\): --atol must be a positive finite number, got nan",
        'model = "embedded:gpt2"\n' + quantize + 'calib_text = "short.txt"\n':
            r"step 2 \(quantize\): calib_text has fewer than the \d+ tokens calibration needs",
    }
    recipe = tmp_path / "r.toml"
    for text, message in cases.items():
        recipe.write_text(text)
        with pytest.raises(InputError, match=message):
            run_recipe(recipe, tmp_path / "out", progress=False)
        assert not list(tmp_path.glob(".out*")), text

    def refused(*args, **kwargs):
        raise InputError("a problem only the step could see")

    monkeypatch.setattr(distill, "distill_model", refused)
    recipe.write_text(top + distill_1)
    with pytest.raises(InputError, match="only the step could see"):
        run_recipe(recipe, tmp_path / "out", progress=False)
    assert not list(tmp_path.glob(".out*"))  # the next run needs no --force
