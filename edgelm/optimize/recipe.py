"""``edgelm optimize run RECIPE.toml -o OUT``: distill, prune, export and quantize from one file.

A recipe::

    model = "embedded:gpt2"                  # where the chain starts (HF folder, hub id, embedded:NAME)
    train_text = "benchmarks/data/austen-train.txt"
    eval_text = "edgelm/assets/text/heldout.txt"   # optional (default: edgelm's held-out text)
    eval_length = 128                        # optional perplexity window (default: 128), stride half of it

    [[step]]
    kind = "distill"                         # settings as on the command line, with underscores
    student_layers = 2
    minutes = 20

    [[step]]
    kind = "prune"
    heads = 0.25
    mlp = 0.30
    recover_steps = 200

    [[step]]
    kind = "export"

    [[step]]
    kind = "quantize"
    mode = "int8-dynamic"

Relative paths are read from the recipe's folder. PyTorch steps (distill, prune) come first, then
export, then quantize (which takes the latest artifact). Every step is measured the same way: the
starting model and the output of every step are exported to fp32 ONNX where they are not ONNX
already, scored for perplexity on the held-out text, weighed (bytes of the graph and its weights),
and decoded by edgelm's runtime in one interleaved loop at the end (so a busy machine slows every
row alike). OUT holds:

    model/          the final artifact; its manifest lists every step (the lineage) and the recipe
    steps/NN-kind/  what each step wrote (and NN-kind-onnx/, the measurement export of a PyTorch step)
    report.md, report.json, report.png   size, decode speed and perplexity after every step

The run works in a hidden folder beside OUT, renamed to OUT at the end; ``--resume`` continues an
interrupted run from its last finished step (a training step from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from .._fs import check_output, replace_folder, within
from ..errors import InputError, is_whole
from .train import STATE_FILE, TRAINING_ONLY

TRAINING_KEYS = {"steps", "minutes", "batch_size", "seq_len", "seed", *TRAINING_ONLY}
STEP_KEYS = {
    "distill": {"student_layers", "student_config"} | TRAINING_KEYS,
    # a prune step's training is its recovery, whose length is recover_steps (the CLI has no --steps)
    "prune": {"heads", "mlp", "importance", "scope", "multiple", "score_batches", "rounds", "recover_steps"}
             | (TRAINING_KEYS - {"steps", "minutes"}),
    "export": {"dtype", "atol", "rtol", "linear_layout"},
    "quantize": {"mode", "target", "algorithm", "block_size", "embeddings", "smooth_alpha", "calib_windows",
                 "calib_length", "max_ppl_increase", "calib_text"},
}
TOP_KEYS = {"model", "train_text", "eval_text", "eval_length", "new_tokens", "repeats", "step"}
# the type of every setting; ranges are the step's own config's to check (built in load_recipe)
_WHOLE = {"steps", "batch_size", "seq_len", "checkpoint_every", "seed", "multiple", "score_batches", "rounds",
          "recover_steps", "block_size", "calib_windows", "calib_length", "eval_length", "new_tokens", "repeats"}
_NUMBER = {"minutes", "lr", "temperature", "alpha", "heads", "mlp", "smooth_alpha", "atol", "rtol"}
_TEXT = {"model", "train_text", "eval_text", "precision", "importance", "scope", "dtype", "linear_layout", "mode",
         "target", "algorithm", "embeddings", "student_config", "calib_text"}


def _check_type(where: str, key: str, value) -> None:
    if key in _WHOLE:
        ok, want = is_whole(value), "a whole number"
    elif key in _NUMBER:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif key in _TEXT:
        ok, want = isinstance(value, str), "a string"
    elif key == "student_layers":
        ok, want = isinstance(value, (int, str)) and not isinstance(value, bool), "a whole number or a string"
    elif key == "max_ppl_increase":
        ok, want = isinstance(value, (str, int, float)) and not isinstance(value, bool), 'a percentage such as "1.5%"'
    else:
        return
    if not ok:
        raise InputError(f"{where}: {key} must be {want}, got {value!r}")


TORCH_STEPS = ("distill", "prune")


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from ..errors import require

        tomllib = require("tomli", "export")
    return tomllib


def load_recipe(path: str | Path) -> dict:
    """Read and check a recipe; every problem is one sentence that names the step and the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no recipe {path}; pass a TOML file (see edgelm optimize run --help)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        recipe = _toml().loads(text)
    except Exception as exc:  # tomllib.TOMLDecodeError
        raise InputError(f"{path} is not valid TOML ({exc}); fix the recipe") from None
    unknown = set(recipe) - TOP_KEYS
    if unknown:
        raise InputError(f"{path}: unknown top-level setting(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(sorted(TOP_KEYS - {'step'}))} and [[step]] tables")
    if "model" not in recipe:
        raise InputError(f"{path} has no 'model'; say where the chain starts, e.g. model = \"embedded:gpt2\"")
    steps = recipe.get("step")
    if not isinstance(steps, list) or not steps:
        raise InputError(f"{path} has no [[step]] tables; add at least one (kind = distill, prune, export or quantize)")
    for key in TOP_KEYS - {"step"}:
        if key in recipe:
            _check_type(str(path), key, recipe[key])
    for key, least in {"eval_length": 2, "new_tokens": 2, "repeats": 1}.items():
        if key in recipe and recipe[key] < least:
            raise InputError(f"{path}: {key} must be at least {least}, got {recipe[key]}")
    seen_onnx = False
    fp16_export = None
    configs = []  # each step's own config, built (and range-checked) once, before any work is done
    for n, step in enumerate(steps, 1):
        if not isinstance(step, dict):
            raise InputError(f"{path}: step {n} is {step!r}, not a table; write each step as a [[step]] table "
                             "with kind = \"distill\", \"prune\", \"export\" or \"quantize\"")
        kind = step.get("kind")
        if kind not in STEP_KEYS:
            raise InputError(f"{path}: step {n} has kind {kind!r}; choose one of {', '.join(STEP_KEYS)}")
        extra = set(step) - STEP_KEYS[kind] - {"kind"}
        if extra:
            raise InputError(f"{path}: step {n} ({kind}) has no setting(s) {', '.join(sorted(extra))}; known: "
                             f"{', '.join(sorted(STEP_KEYS[kind]))}")
        if kind in TORCH_STEPS and seen_onnx:
            raise InputError(f"{path}: step {n} ({kind}) comes after an export or quantize step; PyTorch steps "
                             "must come first")
        if kind in TORCH_STEPS and "train_text" not in recipe:
            raise InputError(f"{path}: step {n} ({kind}) needs train_text at the top of the recipe")
        if kind == "export" and seen_onnx:
            raise InputError(f"{path}: step {n} exports a model that is already ONNX; remove the second export")
        if kind == "quantize" and any(s.get("kind") == "quantize" for s in steps[:n - 1]):
            raise InputError(f"{path}: step {n} quantizes a model that an earlier step quantized; keep one quantize step")
        for key, value in step.items():
            if key != "kind":
                _check_type(f"{path}: step {n} ({kind})", key, value)
        configs.append(_build_config(kind, step, f"{path}: step {n} ({kind})"))
        if kind == "export" and step.get("dtype", "fp32") != "fp32":
            fp16_export = n
        if kind == "quantize" and fp16_export:
            raise InputError(f"{path}: step {n} quantizes the {steps[fp16_export - 1]['dtype']} export of step "
                             f"{fp16_export}; quantization takes fp32: remove that export's dtype")
        seen_onnx = seen_onnx or kind in ("export", "quantize")
    base = path.resolve().parent
    for key in ("train_text", "eval_text"):
        if key in recipe:
            recipe[key] = str(_relative(recipe[key], base))
    for step in steps:
        for key in ("student_config", "calib_text"):
            if key in step:
                step[key] = str(_relative(step[key], base))
    model = str(recipe["model"])
    if not model.startswith("embedded:") and (base / model).exists():
        recipe["model"] = str(base / model)
    recipe["_configs"] = configs
    recipe["_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    recipe["_text"] = text
    recipe["_path"] = str(path)
    return recipe


def _build_config(kind: str, step: dict, where: str):
    """The step's own config object (its checks are the CLI's); a problem names the step."""
    try:
        if kind == "distill":
            train = _train_config(step)
            if ("student_layers" in step) == ("student_config" in step):
                raise InputError("give student_layers or student_config (exactly one)")
            return train
        if kind == "prune":
            from .prune import PruneConfig

            pcfg = PruneConfig(**{k: step[k] for k in ("heads", "mlp", "importance", "scope", "multiple", "seed",
                                                       "batch_size", "seq_len", "rounds") if k in step},
                               batches=int(step.get("score_batches", 16)))
            pcfg.check_given({"batches" if k == "score_batches" else k for k in step})
            recover = int(step.get("recover_steps", 0))
            if recover < 0:
                raise InputError(f"recover_steps must be 0 or more, got {recover}")
            unused = sorted(set(step) & set(TRAINING_ONLY))
            if unused and not recover:
                raise InputError(f"{', '.join(unused)} set the recovery training, which runs only with "
                                 "recover_steps = N; add recover_steps, or leave them out")
            return pcfg, (_train_config(step, recover) if recover else None)
        if kind == "quantize":
            from .quantize import QuantizeConfig, parse_percent, plan

            qkeys = {k: step[k] for k in STEP_KEYS["quantize"] - {"calib_text"} if k in step}
            if "max_ppl_increase" in qkeys:
                qkeys["max_ppl_increase"] = parse_percent(str(qkeys["max_ppl_increase"]))
            qcfg = QuantizeConfig(**qkeys)
            plan(qcfg, step.get("calib_text"), qkeys)  # a target, mode, calibration text and settings that go together
            return qcfg
        from ..export.pipeline import check_settings

        check_settings(step.get("dtype", "fp32"), linear_layout=step.get("linear_layout", "auto"),
                       atol=step.get("atol"), rtol=step.get("rtol"))
        return None
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def check_inputs(recipe: dict, source_dir: Path) -> None:
    """What the steps would refuse only once running, checked before the run starts: the texts and
    files they read, and, following the model through the chain, the layers each distill keeps and each
    training window against the texts and the contexts. A problem names the step and the recipe's key."""
    from ..export.arch import resolve
    from ..export.checkpoint import read_config
    from .calibration import MIN_TOKENS
    from .distill import EVAL_TEXT, layer_kind_names, parse_layers, read_student_config, student_config
    from .evaluate import read_text
    from .models import tokenizer_for

    path = recipe["_path"]
    tokenizer = tokenizer_for(source_dir)

    def tokens(key: str, file) -> int:
        try:
            return len(tokenizer.encode(read_text(file, f"{key} in the recipe")))
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None

    eval_tokens = tokens("eval_text", recipe.get("eval_text") or EVAL_TEXT)
    if eval_tokens < 3:  # the fewest a score before and after training takes
        raise InputError(f"{path}: eval_text has {eval_tokens} tokens, too few to score; give a longer eval_text")
    train_tokens = tokens("train_text", recipe["train_text"]) if "train_text" in recipe else None
    config = read_config(source_dir)  # the model each step starts from
    for n, (step, built) in enumerate(zip(recipe["step"], recipe["_configs"]), 1):
        where, kind = f"{path}: step {n} ({step['kind']})", step["kind"]
        try:
            if kind in TORCH_STEPS:
                train = built if kind == "distill" else built[0]  # a prune step scores with its own seq_len
                teacher_context = resolve(config).max_positions
                if kind == "distill":
                    if "student_layers" in step:
                        kinds = layer_kind_names(config)
                        config = student_config(config, parse_layers(str(step["student_layers"]), kinds,
                                                                     "student_layers"))
                    else:
                        config = read_student_config(step["student_config"], config)
                context = min(teacher_context, resolve(config).max_positions)
                if train.seq_len > context:
                    raise InputError(f"seq_len {train.seq_len} is longer than the model's context of {context}; "
                                     f"choose seq_len <= {context}")
                if train_tokens < train.seq_len + 1:
                    raise InputError(f"train_text has {train_tokens} tokens, fewer than one sequence of "
                                     f"{train.seq_len + 1}; give a longer train_text or a smaller seq_len")
            if kind == "quantize" and "calib_text" in step and tokens("calib_text", step["calib_text"]) < MIN_TOKENS:
                raise InputError(f"calib_text has fewer than the {MIN_TOKENS} tokens calibration needs; give a "
                                 "longer text")
        except InputError as exc:
            raise InputError(exc.args[0] if str(exc).startswith(path) else f"{where}: {exc}") from None


def _relative(value, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _train_config(step: dict, length_default: int | None = None):
    from .train import TrainConfig

    keys = {k: step[k] for k in TRAINING_KEYS if k in step}
    if length_default is not None and "steps" not in keys and "minutes" not in keys:
        keys["steps"] = length_default
    return TrainConfig(**keys)


class _Run:
    """The working folder of one recipe run: what is done, where it is (for --resume)."""

    def __init__(self, work: Path, recipe: dict, resume: bool, force: bool = False):
        self.work, self.state_path = work, work / "state.json"
        if work.exists() and (not self.state_path.is_file() or (force and not resume)):
            shutil.rmtree(work)  # interrupted before its first record (nothing to resume), or --force: start over
        if work.exists() and not resume:
            raise InputError(f"an unfinished run of a recipe is in {work}; pass --resume to continue it, or --force "
                             "to start over")
        if resume and self.state_path.is_file():
            try:
                self.state = json.loads(self.state_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.state = None
            if not (isinstance(self.state, dict) and isinstance(self.state.get("recipe_sha256"), str)
                    and isinstance(self.state.get("done"), dict)):
                raise InputError(f"the unfinished run's record {self.state_path} is damaged; run without --resume "
                                 "and with --force to start over")
            if self.state["recipe_sha256"] != recipe["_sha256"]:
                raise InputError(f"the unfinished run in {work} was made from another version of the recipe; "
                                 "restore that recipe, or run without --resume and with --force to start over")
        else:
            if resume:
                raise InputError(f"--resume was given but there is no unfinished run in {work}; run without --resume")
            (work / "steps").mkdir(parents=True)
            self.state = {"recipe_sha256": recipe["_sha256"], "done": {}}
            self.save()

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.state_path)

    def done(self, key: str) -> dict | None:
        return self.state["done"].get(key)

    def finish(self, key: str, entry: dict) -> dict:
        self.state["done"][key] = entry
        self.save()
        return entry


def run_recipe(recipe_path: str | Path, out: str | Path, force: bool = False, resume: bool = False,
               progress: bool = True) -> dict:
    """Run every step of a recipe into ``out``; return the report (also written as report.json)."""
    from ..export.arch import resolve
    from ..export.checkpoint import read_config
    from .measure import MeasureConfig
    from .models import model_dir_of

    recipe = load_recipe(recipe_path)
    out = Path(out)
    step_inputs = [step.get(k) for step in recipe["step"] for k in ("calib_text", "student_config")]
    check_output(out, force, inputs=[recipe["model"], recipe_path, recipe.get("train_text"), recipe.get("eval_text"),
                                     *step_inputs])
    eval_length = int(recipe.get("eval_length", 128))
    source_dir = model_dir_of(recipe["model"])
    context = resolve(read_config(source_dir)).max_positions
    if eval_length > context:
        raise InputError(f"{recipe['_path']}: eval_length {eval_length} is longer than the model's context of "
                         f"{context}; choose eval_length <= {context}")
    measure = MeasureConfig(max_length=eval_length, stride=max(1, eval_length // 2),
                            new_tokens=int(recipe.get("new_tokens", 64)), repeats=int(recipe.get("repeats", 3)))
    if measure.prompt_tokens + measure.new_tokens > context:
        raise InputError(f"{recipe['_path']}: new_tokens {measure.new_tokens} after the {measure.prompt_tokens}-token "
                         f"prompt pass the model's context of {context}; choose new_tokens <= "
                         f"{context - measure.prompt_tokens}")
    check_inputs(recipe, source_dir)
    work = out.parent / f".{out.name}.recipe-run"
    run = _Run(work, recipe, resume, force)
    try:
        return _run_steps(recipe, run, out, source_dir, measure, eval_length, resume, progress)
    except InputError:
        if set(run.state["done"]) <= {"source"}:  # no step finished: nothing for --resume to keep
            shutil.rmtree(work, ignore_errors=True)
        raise


def _run_steps(recipe: dict, run: _Run, out: Path, source_dir: Path, measure, eval_length: int, resume: bool,
               progress: bool) -> dict:
    from ..export import export_model
    from ..manifest import read_manifest, write_manifest
    from .distill import distill_model
    from .prune import prune_model
    from .quantize import quantize_artifact

    work = run.work
    say = print if progress else (lambda *a, **k: None)
    steps_dir = work / "steps"
    eval_text = recipe.get("eval_text")

    def export_for_measure(model_dir: Path, folder: Path) -> None:
        if not (folder / "manifest.json").is_file():
            export_model(str(model_dir), folder, progress=False, force=True)

    # the starting point, measured like every step
    stages = []
    entry = run.done("source") or run.finish("source", {"artifact": str(steps_dir / "00-source"), "record": None})
    say(f"[0/{len(recipe['step'])}] source {recipe['model']}: exporting fp32 for the measurements")
    export_for_measure(source_dir, Path(entry["artifact"]))
    stages.append({"name": "source", "kind": "source", "artifact": entry["artifact"], "record": None})
    model_dir, artifact = source_dir, Path(entry["artifact"])
    for n, (step, config) in enumerate(zip(recipe["step"], recipe["_configs"]), 1):
        kind, key = step["kind"], f"{n:02d}-{step['kind']}"
        folder = steps_dir / key
        settings = {k: v for k, v in step.items() if k != "kind"}
        say(f"[{n}/{len(recipe['step'])}] {kind} {json.dumps(settings) if settings else ''}")
        entry = run.done(key)
        if entry is None:
            started = time.perf_counter()
            checkpoints = work / f"{key}.ckpt"  # a run killed before its first checkpoint leaves it empty
            has_checkpoint = (checkpoints / STATE_FILE).is_file()
            if kind == "distill":
                record = distill_model(str(model_dir), folder, recipe["train_text"], config,
                                       student_layers=None if "student_layers" not in step else str(step["student_layers"]),
                                       student_config_file=step.get("student_config"), eval_text=eval_text,
                                       eval_length=eval_length, resume=resume and has_checkpoint,
                                       force=True, progress=progress, checkpoint_dir=checkpoints)
            elif kind == "prune":
                pcfg, recover = config
                record = prune_model(str(model_dir), folder, recipe["train_text"], pcfg, recover=recover,
                                     eval_text=eval_text, eval_length=eval_length,
                                     resume=resume and has_checkpoint, force=True,
                                     progress=progress, checkpoint_dir=checkpoints)
            elif kind == "export":
                manifest = export_model(str(model_dir), folder, dtype=step.get("dtype", "fp32"), atol=step.get("atol"),
                                        rtol=step.get("rtol"), linear_layout=step.get("linear_layout", "auto"),
                                        force=True, progress=progress)
                record = manifest["steps"][-1]
            else:
                manifest = quantize_artifact(artifact, folder, config, measure,
                                             calib_text=step.get("calib_text"), eval_text=eval_text, force=True,
                                             progress=progress, given=set(step) & set(STEP_KEYS["quantize"]))
                record = manifest["steps"][-1]
            entry = run.finish(key, {"folder": str(folder), "record": record,
                                     "seconds": round(time.perf_counter() - started, 2)})
        if kind in TORCH_STEPS:
            model_dir = Path(entry["folder"])
            artifact = steps_dir / f"{key}-onnx"
            export_for_measure(model_dir, artifact)
        else:
            artifact = Path(entry["folder"])
        stages.append({"name": key, "kind": kind, "artifact": str(artifact), "record": entry["record"]})

    say("measuring every stage: perplexity, size, decode speed")
    report = measure_stages(stages, recipe, measure, progress)
    final = Path(stages[-1]["artifact"])
    # the final artifact goes to OUT/model and the work folder becomes OUT: the report and the
    # lineage's step records name the folders where they will be
    def moved(path: str) -> str:
        here = work / "model" if path == str(final) else Path(path)
        return str(out / here.relative_to(work)) if within(here, work) else path

    for row in report["rows"]:
        row["artifact"] = moved(row["artifact"])
    manifest = read_manifest(final)
    for record in manifest["steps"]:
        for key, value in record.items():
            if isinstance(value, str) and value.startswith(str(work)):
                record[key] = moved(value)
    manifest["recipe"] = {"file": Path(recipe["_path"]).name, "sha256": recipe["_sha256"], "text": recipe["_text"],
                          "report": report["rows"]}
    write_manifest(final, manifest)
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "report.md").write_text(report_markdown(report))
    plot_report(report, work / "report.png")
    final.rename(work / "model")
    for ckpt in work.glob("*.ckpt"):
        shutil.rmtree(ckpt, ignore_errors=True)
    replace_folder(work, out)
    (out / "state.json").unlink()
    report["output"] = str(out)
    return report


def measure_stages(stages: list[dict], recipe: dict, measure, progress: bool) -> dict:
    """Size, perplexity and decode speed of every stage's artifact; speed in one interleaved loop."""
    from ..runtime.artifact import Tokenizer
    from .distill import EVAL_TEXT
    from .evaluate import onnx_perplexity, read_text
    from .measure import decode_speeds, model_bytes

    text = read_text(recipe.get("eval_text") or EVAL_TEXT)
    folders = {s["name"]: Path(s["artifact"]) for s in stages}
    prompt = Tokenizer(folders["source"]).encode(text)[:measure.prompt_tokens]
    speeds = decode_speeds(folders, prompt, measure, progress=progress)
    rows = []
    for s in stages:
        folder = folders[s["name"]]
        ppl = onnx_perplexity(folder, text, measure.stride, measure.max_length)
        record = s["record"] or {}
        rows.append({"stage": s["name"], "kind": s["kind"], "artifact": str(folder), "model_bytes": model_bytes(folder),
                     "perplexity": round(ppl.perplexity, 4), "decode_tokens_per_s": speeds[s["name"]]["tokens_per_s"],
                     "decode_runs": speeds[s["name"]]["runs"], "kernels": speeds[s["name"]]["kernels"],
                     "seconds": record.get("seconds"),
                     "energy_joules": (record.get("energy") or {}).get("joules")})
    base = rows[0]
    for r in rows:
        r["size_vs_source"] = round(r["model_bytes"] / base["model_bytes"], 4)
        r["speedup_vs_source"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
        r["perplexity_vs_source"] = round(r["perplexity"] / base["perplexity"] - 1, 4)
    return {"recipe": recipe["_path"], "model": recipe["model"], "eval_text": recipe.get("eval_text") or str(EVAL_TEXT),
            "eval_window": measure.max_length, "eval_stride": measure.stride, "prompt_tokens": len(prompt),
            "new_tokens": measure.new_tokens, "repeats": measure.repeats, "rows": rows}


def report_markdown(report: dict) -> str:
    lines = [f"# Recipe report: {Path(report['recipe']).name}", "",
             f"Starting model: {report['model']}. Perplexity on {report['eval_text']} ({report['eval_window']}-token "
             f"windows, stride {report['eval_stride']}); decode speed: edgelm runtime, greedy, {report['new_tokens']} "
             f"tokens after a {report['prompt_tokens']}-token prompt, median of {report['repeats']} interleaved rounds. "
             "Stages that are PyTorch models are measured through their fp32 export.", "",
             "| stage | size (MB) | size vs source | decode tok/s | speed-up | perplexity | ppl vs source | step time (s) "
             "| step energy (J) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        energy = "" if r["energy_joules"] is None else f"{r['energy_joules']:.0f}"
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['stage']} | {r['model_bytes'] / 1e6:.1f} | {r['size_vs_source']:.3f}x | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['speedup_vs_source']:.2f}x | {r['perplexity']:.2f} | "
                     f"{r['perplexity_vs_source']:+.1%} | {seconds} | {energy} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the chart is optional; the Markdown and JSON carry the same numbers
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["stage"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("model_bytes", "decode_tokens_per_s", "perplexity"),
                              ("size (MB)", "decode tokens/s (edgelm runtime)", "held-out perplexity")):
        values = [r[key] / (1e6 if key == "model_bytes" else 1) for r in rows]
        bars = ax.bar(range(len(rows)), values, color=["#888888"] + ["#3b75af"] * (len(rows) - 1))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
    fig.suptitle(f"{Path(report['recipe']).name}: every step against the source ({report['model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
