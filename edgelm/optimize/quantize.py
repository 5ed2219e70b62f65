"""``quantize_artifact``: load, check, quantize, measure, gate, and only then move into place.

    quantize_artifact("out/gpt2", "out/gpt2-int8", QuantizeConfig(mode="int8-dynamic"))
    quantize_artifact("out/gpt2", "out/gpt2-q", QuantizeConfig(mode="auto", max_ppl_increase=0.015))

Every quantized artifact carries, in its manifest's last step, the perplexity before and after on
the evaluation text, the model size before and after, and the decode speed before and after
(measured with edgelm's runtime when the target is this machine). A result over the perplexity
limit is refused and nothing is written. ``mode="auto"`` builds each candidate that fits the
target, measures all of them, and keeps the fastest within the limit.
"""

from __future__ import annotations

import copy
import math
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..bench.energy import current_step, measured_step
from .. import __version__
from .._fs import atomic_output_dir, check_output, file_table
from ..errors import InputError, QualityError
from ..manifest import read_manifest, write_manifest
from .measure import MeasureConfig, decode_speeds, model_bytes, perplexity
from .modes import MODES, Calibration, Job
from .targets import TARGETS, Target, resolve_target, this_machine

TEXT_DIR = Path(__file__).resolve().parent.parent / "assets" / "text"
DEFAULT_CALIB_TEXT = TEXT_DIR / "calibration.txt"
DEFAULT_EVAL_TEXT = TEXT_DIR / "heldout.txt"
EMBEDDINGS = ("keep", "quantize")
ALGORITHMS = ("rtn", "gptq")
AUTO_LIMIT = 0.015


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "auto"
    target: str = "auto"
    algorithm: str = "rtn"  # weight-only modes: rtn | gptq
    block_size: int = 32  # weight-only modes: values per scale along K
    embeddings: str = "quantize"  # the tied embedding / LM head: keep | quantize
    smooth_alpha: float = 0.5  # int8-static: SmoothQuant migration strength; 0 switches SmoothQuant off
    calib_windows: int = 32
    calib_length: int = 256
    max_ppl_increase: float | None = None  # a fraction (0.015 = 1.5%); None: the mode's default

    def __post_init__(self):
        problems = []
        if self.mode != "auto" and self.mode not in MODES:
            problems.append(f"mode '{self.mode}' is unknown; choose auto or one of {', '.join(MODES)}")
        if self.target != "auto" and self.target not in TARGETS:
            problems.append(f"target '{self.target}' is unknown; choose auto or one of {', '.join(TARGETS)}")
        if self.algorithm not in ALGORITHMS:
            problems.append(f"algorithm '{self.algorithm}' is unknown; choose {' or '.join(ALGORITHMS)}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            problems.append(f"--block-size must be a power of two of at least 16 (16, 32, 64, 128), got {self.block_size}")
        if self.embeddings not in EMBEDDINGS:
            problems.append(f"--embeddings must be keep or quantize, got '{self.embeddings}'")
        if not 0 <= self.smooth_alpha < 1:
            problems.append(f"the SmoothQuant alpha must be in [0, 1), got {self.smooth_alpha}")
        if self.calib_windows < 1 or self.calib_length < 2:
            problems.append("calibration needs at least 1 window of at least 2 tokens")
        if self.max_ppl_increase is not None and not (0 <= self.max_ppl_increase and math.isfinite(self.max_ppl_increase)):
            problems.append(f"--max-ppl-increase must be a percentage of 0 or more, got {self.max_ppl_increase!r}")
        if problems:
            raise InputError("; ".join(problems))

    def limit(self, mode: str) -> float:
        if self.max_ppl_increase is not None:
            return self.max_ppl_increase
        return AUTO_LIMIT if self.mode == "auto" else MODES[mode].default_limit

    def settings(self, mode: str) -> dict:
        """The settings that matter to ``mode`` (recorded in the manifest)."""
        out = {"embeddings": self.embeddings}
        if mode in ("int8-weight", "int4-weight"):
            out.update(algorithm=self.algorithm, block_size=self.block_size)
        if mode == "int8-static":
            out.update(smooth_alpha=self.smooth_alpha)
        if MODES[mode].needs_calibration(self):
            out.update(calib_windows=self.calib_windows, calib_length=self.calib_length)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def parse_percent(text: str) -> float:
    """'1.5%' or '1.5' -> 0.015. Refuses anything that is not a percentage of 0 or more."""
    raw = str(text).strip()
    number = raw[:-1].strip() if raw.endswith("%") else raw
    try:
        value = float(number)
    except ValueError:
        raise InputError(f"--max-ppl-increase takes a percentage such as 1.5%, got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"--max-ppl-increase must be a percentage of 0 or more, such as 1.5%, got '{text}'")
    return value / 100.0


def _check_source(folder: Path, manifest: dict) -> None:
    done = [s for s in manifest["steps"] if s.get("name") == "quantize"]
    if done or manifest["graph"].get("quantization"):
        mode = done[-1].get("mode") if done else manifest["graph"]["quantization"].get("mode")
        raise InputError(f"{folder} is already quantized ({mode}); quantize the fp32 artifact it was made from "
                         f"({done[-1].get('source') if done else 'see its manifest'})")
    graph = manifest["graph"]
    if graph.get("backend") != "builder":
        raise InputError(f"{folder} was exported with the {graph.get('backend')} backend; quantization needs the "
                         "builder backend's graph (every weight a constant MatMul input): export it again with "
                         "--backend builder")
    if graph.get("dtype") != "fp32":
        raise InputError(f"{folder} is {graph.get('dtype')}; quantize an fp32 artifact (edgelm export --dtype fp32)")


WEIGHT_ONLY = ("int8-weight", "int4-weight")
# the settings that only some modes use: {setting: (the modes that use it, what they are)}
SETTING_MODES = {
    "algorithm": (lambda mode, cfg: mode in WEIGHT_ONLY, "the weight-only modes (int8-weight, int4-weight)"),
    "block_size": (lambda mode, cfg: mode in WEIGHT_ONLY, "the weight-only modes (int8-weight, int4-weight)"),
    "smooth_alpha": (lambda mode, cfg: mode == "int8-static", "int8-static"),
    "calib_windows": (lambda mode, cfg: MODES[mode].needs_calibration(cfg),
                      "the modes that calibrate (int8-static, or a weight-only mode with --algorithm gptq)"),
    "calib_length": (lambda mode, cfg: MODES[mode].needs_calibration(cfg),
                     "the modes that calibrate (int8-static, or a weight-only mode with --algorithm gptq)"),
}


def plan(config: QuantizeConfig, calib_text=None, given=()) -> tuple[Target, bool, list[str]]:
    """(target, whether it is this machine, the modes to try): what a run would do, checked before any
    work (a recipe checks its quantize steps with it before its first step). ``given``: the settings
    the user set (QuantizeConfig's field names); one that no mode to try uses is refused, not ignored."""
    target, here = resolve_target(config.target)
    modes = _modes_to_try(config, target, here)
    if calib_text is not None and not any(MODES[m].needs_calibration(config) for m in modes):
        raise InputError(f"{', '.join(modes)} calibrates nothing, so --calib-text (calib_text in a recipe) would be "
                         "ignored; leave it out, or choose a mode that calibrates (int8-static, or a weight-only "
                         "mode with --algorithm gptq)")
    for key in sorted(set(given) & set(SETTING_MODES)):
        used_by, who = SETTING_MODES[key]
        if not any(used_by(m, config) for m in modes):
            raise InputError(f"{', '.join(modes)} does not use --{key.replace('_', '-')} ({key} in a recipe), which "
                             f"only {who} use; leave it out, or choose such a mode")
    return target, here, modes


def _modes_to_try(config: QuantizeConfig, target: Target, here: bool) -> list[str]:
    if config.mode == "auto":
        if not here:
            raise InputError(f"--mode auto measures speed, so it must run on the target machine; this machine is "
                             f"{this_machine() or platform.machine()}, not {target.name}: run it there, or choose a "
                             "mode (quality is measured here, speed on the target)")
        return list(target.auto_candidates)
    if config.mode not in target.modes:
        raise InputError(f"{config.mode} has no kernels worth using on target {target.name} ({target.why}); "
                         f"choose one of {', '.join(target.modes)}")
    return [config.mode]


def _read_text(path: Path | str | None, default: Path, what: str) -> tuple[str, str]:
    from .evaluate import read_text

    flag = {"evaluation": "eval", "calibration": "calib"}[what]
    if path is None:
        if not default.is_file():
            raise InputError(f"the default {what} text {default} is missing from this installation; pass one "
                             f"with --{flag}-text FILE")
        path = default
    return read_text(path, f"--{flag}-text ({flag}_text in a recipe)"), str(path)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "onnx-ir"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# -- building one candidate -------------------------------------------------------------------------
def _build(job: Job, mode: str, folder: Path, source: Path, src_manifest: dict) -> dict:
    """Quantize into ``folder``: model, the source's other files, a provisional manifest. -> mode record."""
    from .onnx_edit import Graph, attention_for_cuda, count_ops, io_for_cuda, save_model

    started = time.perf_counter()
    model, record = MODES[mode].transform(job)
    cuda = job.target.provider == "cuda" and attention_for_cuda(model) > 0  # the attention CUDA can run
    graph = dict(src_manifest["graph"])
    graph.update(
        file="model.onnx", weight_bytes=Graph(model).weight_bytes(), operators=count_ops(model),
        opset={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        quantization={"mode": mode, "bits": MODES[mode].bits, "target": job.target.name, "format": record["format"]},
        linear_layout="matmul",  # quantized operators are MatMuls (onnx_edit.load_model turns conv layouts back)
    )
    graph["external_data"] = save_model(model, folder / "model.onnx")
    del model
    skip = {src_manifest["graph"]["file"], src_manifest["graph"].get("external_data")}
    for name in src_manifest["files"]:
        if name not in skip:
            shutil.copyfile(source / name, folder / name)
    manifest = copy.deepcopy(src_manifest)
    manifest.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), edgelm_version=__version__,
                    graph=graph, io=io_for_cuda(src_manifest["io"]) if cuda else src_manifest["io"])
    manifest["steps"] = list(src_manifest["steps"]) + [{"name": "quantize", "mode": mode, "provisional": True}]
    manifest["files"] = file_table(folder)
    write_manifest(folder, manifest)
    return {"record": record, "seconds": round(time.perf_counter() - started, 2)}


def _finish(folder: Path, result: dict) -> dict:
    """Write the final manifest of a built candidate: its step record and the quality gate."""
    manifest = read_manifest(folder)
    step = result["step"]
    manifest["steps"][-1] = step
    src_validation = result["source_validation"]
    ppl = step["perplexity"]
    manifest["validation"] = {
        "status": "passed", "method": "perplexity gate against the source artifact",
        "provider": "CPUExecutionProvider", "text": step["evaluation"]["text"],
        "perplexity_before": ppl["before"], "perplexity_after": ppl["after"],
        "increase": ppl["increase"], "limit": ppl["limit"],
        "source_validation": src_validation,
    }
    manifest["files"] = file_table(folder)
    write_manifest(folder, manifest)
    return manifest


# -- the pipeline ------------------------------------------------------------------------------------
@measured_step("quantize")  # time and energy of the whole step, in the step record (as export does)
def quantize_artifact(source: str | Path, out: str | Path, config: QuantizeConfig | None = None,
                      measure: MeasureConfig | None = None, calib_text: str | Path | None = None,
                      eval_text: str | Path | None = None, force: bool = False, progress: bool = True,
                      say=print, given=()) -> dict:
    """Quantize an fp32 builder artifact into a new artifact folder; return its manifest. ``given``:
    the settings of ``config`` the user set, refused where no mode to try uses them (see ``plan``)."""
    from ..bench.energy import peak_rss_bytes  # since this step began (StepMeter resets the mark)
    from ..runtime.artifact import Tokenizer
    from .calibration import make_windows

    config = config or QuantizeConfig()
    measure = measure or MeasureConfig()
    say = say if progress else (lambda *a, **k: None)
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    src_manifest = read_manifest(source, verify_checksums=True)  # a damaged source would be quantized and pass
    _check_source(source, src_manifest)
    check_output(out, force, inputs=[source, calib_text, eval_text])
    target, here, modes = plan(config, calib_text, given)
    text, text_path = _read_text(eval_text, DEFAULT_EVAL_TEXT, "evaluation")
    tokenizer = Tokenizer(source)
    calibration = None
    if any(MODES[m].needs_calibration(config) for m in modes):
        calib, calib_path = _read_text(calib_text, DEFAULT_CALIB_TEXT, "calibration")
        windows = make_windows(tokenizer, calib, min(config.calib_length, int(src_manifest["model"]["facts"]["max_positions"])),
                               config.calib_windows, calib_path)
        calibration = Calibration(windows, src_manifest, progress)
    prompt = tokenizer.encode(text)[:measure.prompt_tokens]
    max_new = int(src_manifest["model"]["facts"]["max_positions"]) - len(prompt)
    if max_new < measure.new_tokens:
        measure = MeasureConfig(**{**measure.to_dict(), "new_tokens": max(2, max_new)})

    say(f"measuring the source: perplexity on {text_path}")
    before = perplexity(source, text, measure)
    if not math.isfinite(before.perplexity):  # no increase could be measured against it
        raise InputError(f"{source} scores a perplexity of {before.perplexity} on the evaluation text: the model or "
                         "the text is broken; check it with edgelm eval before quantizing")
    bytes_before = model_bytes(source)
    common = dict(source=source, src_manifest=src_manifest, config=config, target=target, here=here,
                  text_path=text_path, before=before, bytes_before=bytes_before, calibration=calibration,
                  measure=measure, prompt=prompt, progress=progress)

    with tempfile.TemporaryDirectory(prefix="edgelm-quantize-") as work:
        job = Job(source / src_manifest["graph"]["file"], src_manifest, config, target, calibration, progress,
                  Path(work))
        if len(modes) == 1:
            with atomic_output_dir(out, force) as tmp:
                say(f"quantizing: {modes[0]} for {target.name}")
                built = {modes[0]: _build(job, modes[0], tmp, source, src_manifest)}
                rows = _evaluate({modes[0]: tmp}, built, text, **common, say=say)
                row = rows[0]
                if not row["within_limit"]:
                    raise QualityError(
                        f"{modes[0]} raised perplexity by {row['increase']:+.2%} ({before.perplexity:.3f} -> "
                        f"{row['perplexity']:.3f}), more than the allowed {config.limit(modes[0]):.2%}; nothing was "
                        "written. Try another mode, --embeddings keep, --algorithm gptq, or a higher --max-ppl-increase")
                step = _step(modes[0], row, built[modes[0]], None, started, **common)
                manifest = _finish(tmp, {"step": {**step, "peak_rss_bytes": peak_rss_bytes()},
                                         "source_validation": src_manifest["validation"]})
            return manifest

        folders = {}
        built = {}
        for m in modes:
            folders[m] = Path(work) / m
            folders[m].mkdir()
            say(f"quantizing candidate: {m} for {target.name}")
            built[m] = _build(job, m, folders[m], source, src_manifest)
        rows = _evaluate(folders, built, text, **common, say=say)
        passing = [r for r in rows if r["within_limit"]]
        if not passing:
            tried = ", ".join(f"{r['mode']} {r['increase']:+.2%}" for r in rows)
            err = QualityError(f"no candidate stayed within +{config.limit(modes[0]):.2%} perplexity ({tried}); "
                               "nothing was written. Raise --max-ppl-increase, or try --embeddings keep or "
                               "--algorithm gptq")
            err.table = format_table(rows, before.perplexity)
            raise err
        best = max(passing, key=lambda r: r["decode_tokens_per_s"])
        for r in rows:
            r["chosen"] = r is best
        step = _step(best["mode"], best, built[best["mode"]], rows, started, **common)
        with atomic_output_dir(out, force) as tmp:
            for f in folders[best["mode"]].iterdir():
                shutil.move(str(f), tmp / f.name)
            manifest = _finish(tmp, {"step": {**step, "peak_rss_bytes": peak_rss_bytes()},
                                     "source_validation": src_manifest["validation"]})
        return manifest


def _evaluate(folders: dict[str, Path], built: dict, text: str, *, source, target, here, before, bytes_before,
              measure, prompt, config, progress, say, **_) -> list[dict]:
    """Perplexity and size of every candidate; decode speed of all of them and the source, interleaved."""
    rows = []
    for m, folder in folders.items():
        say(f"measuring {m}: perplexity")
        ppl = perplexity(folder, text, measure)
        increase = ppl.perplexity / before.perplexity - 1.0
        rows.append({"mode": m, "perplexity": round(ppl.perplexity, 4), "increase": round(increase, 6),
                     "model_bytes": model_bytes(folder), "size_ratio": round(model_bytes(folder) / bytes_before, 4),
                     "within_limit": increase <= config.limit(m), "limit": config.limit(m),
                     "seconds_to_build": built[m]["seconds"]})
    if here:
        say("measuring decode speed (source and candidates, interleaved)")
        speeds = decode_speeds({"source": source, **folders}, prompt, measure, target.provider, progress)
        for r in rows:
            r["decode_tokens_per_s"] = speeds[r["mode"]]["tokens_per_s"]
            r["speedup"] = round(r["decode_tokens_per_s"] / speeds["source"]["tokens_per_s"], 3)
            r["runs"], r["kernels"] = speeds[r["mode"]]["runs"], speeds[r["mode"]]["kernels"]
        for r in rows:
            r["source_tokens_per_s"] = speeds["source"]["tokens_per_s"]
            r["source_runs"], r["source_kernels"] = speeds["source"]["runs"], speeds["source"]["kernels"]
    else:
        for r in rows:
            r["decode_tokens_per_s"] = None
    return rows


def _step(mode: str, row: dict, built: dict, rows: list[dict] | None, started: float, *, source, src_manifest,
          config, target, here, text_path, before, bytes_before, calibration, measure, prompt, **_) -> dict:
    record = dict(built["record"])
    embeddings = record.pop("embeddings")
    if here:
        speed = {"before": row["source_tokens_per_s"], "after": row["decode_tokens_per_s"], "speedup": row["speedup"],
                 "provider": target.provider, "prompt_tokens": len(prompt), "new_tokens": measure.new_tokens,
                 "repeats": measure.repeats, "runs_before": row["source_runs"], "runs_after": row["runs"],
                 "kernels_before": row["source_kernels"], "kernels_after": row["kernels"],
                 "machine": this_machine() if target.provider == "cpu" else "cuda"}
    else:
        speed = f"not measured: target {target.name} is not this machine ({this_machine() or platform.machine()})"
    step = {
        "name": "quantize", "mode": mode, "requested_mode": config.mode,
        "settings": config.settings(mode), "quantization": record,
        "target": {"name": target.name, "description": target.description, "provider": target.provider,
                   "this_machine": here, "why": target.why},
        "source": str(source),
        "calibration": calibration.windows.describe() if calibration and MODES[mode].needs_calibration(config) else None,
        "evaluation": {"text": text_path, "tokens": before.tokens, "max_length": before.max_length,
                       "stride": before.stride, "provider": "CPUExecutionProvider"},
        "perplexity": {"before": round(before.perplexity, 4), "after": row["perplexity"], "increase": row["increase"],
                       "limit": row["limit"], "passed": row["within_limit"]},
        "size": {"model_bytes_before": bytes_before, "model_bytes_after": row["model_bytes"],
                 "ratio": row["size_ratio"]},
        "decode_tokens_per_s": speed,
        "embeddings": embeddings,
        "seconds": round(time.perf_counter() - started, 2),
        "energy": current_step().finish()["energy"],
        "versions": _versions(),
    }
    if rows is not None:
        step["candidates"] = [{k: v for k, v in r.items() if k not in ("runs", "source_runs")} for r in rows]
    return step


def format_table(rows: list[dict], ppl_before: float | None = None) -> str:
    """The candidates as a fixed-width table (what ``--mode auto`` prints)."""
    head = f"{'mode':<14}{'perplexity':>12}{'change':>10}{'size MB':>10}{'tok/s':>9}{'speedup':>9}  verdict"
    lines = [head, "-" * len(head)]
    if ppl_before is not None:
        src = rows[0].get("source_tokens_per_s")
        speed = f"{src:.1f}" if src else "-"
        size = rows[0]["model_bytes"] / rows[0]["size_ratio"] / 1e6
        lines.append(f"{'fp32 source':<14}{ppl_before:>12.3f}{'':>10}{size:>10.1f}{speed:>9}{'1.00x' if src else '-':>9}")
    for r in rows:
        tps = r.get("decode_tokens_per_s")
        verdict = ("kept" if r.get("chosen") else "within limit") if r["within_limit"] else \
            f"over the limit (+{r['limit']:.2%})"
        speed = f"{tps:.1f}" if tps else "-"
        speedup = f"{r['speedup']:.2f}x" if tps else "-"
        lines.append(f"{r['mode']:<14}{r['perplexity']:>12.3f}{r['increase']:>+10.2%}{r['model_bytes'] / 1e6:>10.1f}"
                     f"{speed:>9}{speedup:>9}  {verdict}")
    return "\n".join(lines)
