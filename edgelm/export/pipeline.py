"""``export_model``: load, check, build, validate, describe, and only then move into place."""

from __future__ import annotations

import math
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from .._fs import atomic_output_dir, check_output, file_table
from ..bench.energy import current_step, measured_step
from ..errors import InputError
from ..manifest import FORMAT, SCHEMA_VERSION, read_lineage, write_manifest
from ..runtime import native
from ..runtime.sampling import model_defaults
from . import validate as V
from .arch import arch_for, resolve
from .graph import EXTERNAL_DATA_BYTES
from .builder import LINEAR_LAYOUTS, OPSET_NOTE, PADDINGS, build_graph, count_ops, default_linear_layout, io_spec
from .checkpoint import (large_blocks_from_the_os, release_memory, copy_tokenizer, open_checkpoint, read_config,
                         read_generation_config, resolve_model_dir)

BACKENDS = ("builder", "optimum")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("onnx", "onnxruntime", "onnxruntime-gpu", "torch", "transformers", "optimum-onnx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check_settings(dtype: str = "fp32", backend: str = "builder", linear_layout: str = "auto",
                   padding: str | None = None, atol: float | None = None, rtol: float | None = None,
                   validate: bool = True) -> str:
    """Refuse settings that cannot go together, before any work (a recipe's export steps are checked
    with it before the recipe's first step); return the linear layout "auto" stands for."""
    if dtype not in V.DEFAULT_ATOL:
        raise InputError(f"dtype '{dtype}' is not supported; choose one of {', '.join(V.DEFAULT_ATOL)}")
    if backend not in BACKENDS:
        raise InputError(f"backend '{backend}' is not supported; choose one of {', '.join(BACKENDS)}")
    if linear_layout == "auto":
        linear_layout = default_linear_layout(dtype) if backend == "builder" else "matmul"
    if linear_layout not in LINEAR_LAYOUTS:
        raise InputError(f"linear layout '{linear_layout}' is not supported; choose auto, {', '.join(LINEAR_LAYOUTS)}")
    if linear_layout in ("conv", "packed") and (dtype != "fp32" or backend != "builder"):
        raise InputError(f"the {linear_layout} linear layout needs --dtype fp32 and the builder backend; "
                         "use --linear-layout matmul (or auto)")
    if padding is not None and (padding not in PADDINGS or backend != "builder"
                                or (padding == "right" and linear_layout == "packed")):
        raise InputError(f"padding '{padding}' is not available here: builder graphs take {' or '.join(PADDINGS)}, "
                         "and the packed layout and the optimum backend take left padding")
    if linear_layout == "packed":
        native.require()  # the graph is validated through the library: refuse now, not after the build
    if not validate and (atol is not None or rtol is not None):
        raise InputError("--atol and --rtol are the validation's tolerances, and --no-validate switches the "
                         "validation off; leave them out, or validate")
    if atol is not None and not 0 < atol < math.inf:
        raise InputError(f"--atol must be a positive finite number, got {atol}")
    if rtol is not None and not 0 <= rtol < math.inf:
        raise InputError(f"--rtol must be zero or a positive finite number, got {rtol}")
    if dtype == "fp16" and padding == "left":  # its -1e9 attention bias is -inf in fp16: NaN logits
        raise InputError("fp16 graphs take right padding (CUDA's attention has no bias, and fp16 cannot hold "
                         "the left padding's mask value); leave out --padding, or export fp32 for left padding")
    return linear_layout


@measured_step("export")  # time, peak memory and energy of the whole export, in the step record
def export_model(model: str, out: str | Path, dtype: str = "fp32", backend: str = "builder",
                 atol: float | None = None, rtol: float | None = None, force: bool = False, validate: bool = True,
                 progress: bool = True, external_data: bool | None = None, linear_layout: str = "auto",
                 padding: str | None = None) -> dict:
    """Export a GPT-2 / GPT-Neo checkpoint (local folder or hub id) to a validated artifact folder.

    ``linear_layout``: "auto" (conv for fp32 builder graphs, else matmul), "conv", "matmul" or "packed"
    (edgelm's own operator, which needs edgelm's runtime library wherever the graph runs); see builder.py.
    ``padding``: how a batch of prompts of different lengths is laid out (builder.py): None for the
    dtype's default ("right" for fp16, which CUDA's attention needs; "left" for fp32), or either one
    for a builder graph outside the packed layout.
    """
    out = Path(out)
    linear_layout = check_settings(dtype, backend, linear_layout, padding, atol, rtol, validate)
    check_output(out, force, inputs=[model])  # refuse before any work
    started = time.perf_counter()
    model_dir = resolve_model_dir(model)
    # a local folder is recorded by its absolute path (bench finds the peers' source by it from any
    # folder); embedded:NAME and hub ids as given
    source = str(model_dir.resolve()) if Path(model).expanduser().exists() else str(model)
    config = read_config(model_dir)
    spec = arch_for(config)
    generation = read_generation_config(model_dir)
    facts = resolve(config, generation)
    sampling = model_defaults(generation, f"{model_dir / 'generation_config.json'}")  # refused now, not at load
    ckpt = open_checkpoint(model_dir)
    atol = atol or V.DEFAULT_ATOL[dtype]
    rtol = V.DEFAULT_RTOL[dtype] if rtol is None else rtol
    bar = _progress if progress else None

    with atomic_output_dir(out, force, inputs=[model_dir]) as tmp:
        tokenizer = copy_tokenizer(model_dir, tmp, facts.vocab_size)
        if backend == "optimum":
            from .optimum_backend import export_with_optimum

            graph, io = export_with_optimum(model_dir, facts, dtype, tmp)
        else:
            weight_bytes = ckpt.nbytes_fp32() // (2 if dtype == "fp16" else 1)
            external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
            summary = build_graph(spec, facts, ckpt, dtype, tmp / "model.onnx", external, progress=bar,
                                  linear_layout=linear_layout, padding=padding)
            release_memory()
            graph = {"file": "model.onnx", "external_data": "model.onnx.data" if summary["external_data"] else None,
                     "dtype": dtype, "backend": "builder",
                     "opset": dict(OPSET_NOTE, **({native.DOMAIN: 1} if linear_layout == "packed" else {})),
                     "weight_bytes": summary["weight_bytes"], "linear_layout": linear_layout}
            io = io_spec(facts, dtype, padding)
        graph["operators"] = count_ops(tmp / graph["file"])
        build_seconds = time.perf_counter() - started
        validation = {"status": "not_validated", "reason": "validation was switched off (--no-validate)"}
        if validate:
            validation = _validate(model_dir, facts, tmp / graph["file"], dtype, atol, rtol, io, progress)
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "edgelm_version": __version__,
            "model": {"source": source, "architecture": spec.hf_class, "model_type": spec.model_type,
                      "facts": facts.to_dict()},
            "graph": graph,
            "io": io,
            "tokenizer": {**tokenizer, "bos_token_id": facts.bos_token_id,
                          "eos_token_id": facts.eos_token_id, "eos_token_ids": list(facts.eos_token_ids)},
            "generation": sampling,
            "steps": read_lineage(model_dir) + [{  # the training steps that made the model, then this one
                "name": "export", "backend": backend, "dtype": dtype, "source": source,
                "seconds": round(time.perf_counter() - started, 2), "build_seconds": round(build_seconds, 2),
                "versions": versions(),
                **{k: v for k, v in current_step().finish().items() if k in ("peak_rss_bytes", "energy")},
            }],
            "validation": validation,
        }
        manifest["files"] = file_table(tmp)
        write_manifest(tmp, manifest)
    return manifest


def _validate(model_dir: Path, facts, onnx_path: Path, dtype: str, atol: float, rtol: float, io: dict,
              progress: bool) -> dict:
    sched = V.make_schedule(facts, padding=io["padding"])
    say = print if progress else (lambda *a, **k: None)
    say(f"validating against PyTorch: batch 2 ({io['padding']}-padded), prompt {sched.steps[0][1]} tokens, "
        f"{len(sched.steps) - 1} decode steps")
    kinds = [c["kind"] for c in io["kv_cache"]]
    large_blocks_from_the_os()  # each step's freed tensors leave the resident set at once
    # The reference waits on disk while ONNX Runtime runs: out of the peak of that phase. It waits in
    # the output's temporary folder: on the output's device (a full disk names it), and removed with
    # that folder on any error, or by the next run for that output when this one is killed outright.
    with tempfile.TemporaryDirectory(prefix=".validate-", dir=onnx_path.parent) as spill:
        reference = V.torch_reference(model_dir, facts, sched, kinds, spill_to=Path(spill) / "fp32")
        own = None
        if dtype == "fp16":  # how far PyTorch's own fp16 is from its fp32: what fp16 arithmetic allows
            say("running PyTorch in fp16 too: an fp16 graph is held to PyTorch fp16's own distance from fp32")
            half = V.torch_reference(model_dir, facts, sched, kinds, spill_to=Path(spill) / "fp16", dtype="fp16")
            own = V.differences(reference, half, sched, atol, rtol, drop=False)
            del half
        try:  # onnx_outputs is a generator: ONNX Runtime starts inside compare
            diffs = V.compare(reference, V.onnx_outputs(onnx_path, facts, sched, io), sched, atol, rtol, own)
        except V.NotRunnable as exc:
            return {"status": "not_validated", "reason": str(exc), "atol": atol, "rtol": rtol}
    note = torch_fp16 = None
    if dtype == "fp16":
        note = ("fp16 was validated on ONNX Runtime's CPU provider; the CUDA provider's fp16 kernels, which "
                "this dtype is meant for, were not run on this machine. Outputs outside atol + rtol x |torch| "
                f"pass when within {V.FP16_FACTOR:g}x PyTorch fp16's own largest and mean |diff| from fp32 "
                "(torch_fp16_max_abs_diff, torch_fp16_mean_abs_diff)")
        torch_fp16 = {"torch_fp16_max_abs_diff": {k: float(f"{v:.4g}") for k, v in own.largest.items()},
                      "torch_fp16_mean_abs_diff": {k: float(f"{v:.4g}") for k, v in own.mean.items()}}
    return {
        "note": note, "rtol": rtol, **(torch_fp16 or {}),
        "status": "passed", "atol": atol, "provider": "CPUExecutionProvider",
        "reference": "transformers (eager attention, fp32)",
        "schedule": {"batch": int(sched.input_ids.shape[0]), "prompt_tokens": sched.steps[0][1],
                     "decode_steps": len(sched.steps) - 1, "total_tokens": int(sched.input_ids.shape[1]),
                     "padding": sched.padding, "padded_tokens": int((sched.attention_mask == 0).sum()),
                     "window_capacity": sched.window_capacity},
        "max_abs_diff": {k: float(f"{v:.4g}") for k, v in diffs.largest.items()},
        "mean_abs_diff": {k: float(f"{v:.4g}") for k, v in diffs.mean.items()},
    }


def _progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)
