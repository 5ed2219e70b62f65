"""``edgelm eval`` and the ``edgelm optimize`` steps (``optimize quantize``)."""

from __future__ import annotations

import argparse
import json

from ..cli import command
from ..runtime.options import PROVIDERS


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="artifact folder (ONNX Runtime), or a model: hub id, HF folder, embedded:NAME (PyTorch)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--stride", type=int, default=None, help="tokens the window advances (default: half the window)")
    p.add_argument("--max-length", type=int, default=None, help="window length (default: context, at most 1024)")
    p.add_argument("--provider", choices=list(PROVIDERS), default="cpu")
    p.add_argument("--json", action="store_true")


@command("eval", "Perplexity of an artifact or a PyTorch model on a text (sliding window).", _configure_eval)
def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import perplexity, read_text

    result = perplexity(args.target, read_text(args.text), args.stride, args.max_length, args.provider)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens "
              f"({result.windows} windows of {result.max_length}, stride {result.stride}; {result.seconds:.1f} s)")
    return 0


def _configure_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="fp32 artifact folder made by 'edgelm export' (builder backend)")
    p.add_argument("-o", "--output", required=True, help="new artifact folder to write")
    p.add_argument("--mode", default="auto",
                   choices=["auto", "int8-dynamic", "int8-static", "int8-weight", "int4-weight"],
                   help="auto tries the modes that fit the target and keeps the fastest within the limit (default)")
    p.add_argument("--target", default="auto", choices=["auto", "avx2", "avx512-vnni", "arm64", "cuda"],
                   help="the machine that will run the model (default: this machine's CPU)")
    p.add_argument("--calib-text", default=None,
                   help="UTF-8 calibration text for int8-static and GPTQ (default: edgelm's calibration.txt)")
    p.add_argument("--eval-text", default=None,
                   help="UTF-8 text the perplexity gate is measured on (default: edgelm's heldout.txt)")
    p.add_argument("--max-ppl-increase", default=None,
                   help="largest perplexity increase allowed, e.g. 1.5%% (default: 1.5%% for int8 modes and auto, "
                        "5%% for int4-weight)")
    p.add_argument("--algorithm", default=None, choices=["rtn", "gptq"],
                   help="weight-only modes: round-to-nearest or GPTQ (calibrated) (default rtn)")
    p.add_argument("--block-size", type=int, default=None, help="weight-only modes: values per scale (default 32)")
    p.add_argument("--embeddings", default="quantize", choices=["keep", "quantize"],
                   help="the tied token embedding / LM head: quantize it too (default) or keep it fp32")
    p.add_argument("--smooth-alpha", type=float, default=None,
                   help="int8-static: SmoothQuant strength, 0 switches it off (default 0.5)")
    p.add_argument("--calib-windows", type=int, default=None,
                   help="modes that calibrate: calibration windows (default 32)")
    p.add_argument("--calib-length", type=int, default=None,
                   help="modes that calibrate: tokens per calibration window (default 256)")
    p.add_argument("--max-length", type=int, default=None, help="perplexity window (default: context, at most 1024)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default: half the window)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per speed measurement (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="speed measurements per artifact; the median is kept")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the quantize step of the manifest as JSON")


@command("optimize quantize", "Quantize an artifact (int8 dynamic/static, int8/int4 weight-only) behind a "
         "perplexity gate.", _configure_quantize)
def run_quantize(args: argparse.Namespace) -> int:
    import sys

    from ..errors import QualityError
    from .measure import MeasureConfig
    from .quantize import QuantizeConfig, format_table, parse_percent, quantize_artifact

    limit = None if args.max_ppl_increase is None else parse_percent(args.max_ppl_increase)
    given = {k: getattr(args, k) for k in ("algorithm", "block_size", "smooth_alpha", "calib_windows", "calib_length")
             if getattr(args, k) is not None}  # the rest keep QuantizeConfig's defaults
    config = QuantizeConfig(mode=args.mode, target=args.target, embeddings=args.embeddings, max_ppl_increase=limit,
                            **given)
    measure = MeasureConfig(max_length=args.max_length, stride=args.stride, new_tokens=args.new_tokens,
                            repeats=args.repeats)
    progress = not (args.quiet or args.json)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k))
    try:
        manifest = quantize_artifact(args.artifact, args.output, config, measure, args.calib_text, args.eval_text,
                                     force=args.force, progress=progress, say=log, given=set(given))
    except QualityError as exc:
        if getattr(exc, "table", None):
            print(exc.table, file=sys.stderr)
        raise
    step = manifest["steps"][-1]
    if args.json:
        print(json.dumps(step, indent=2))
        return 0
    if "candidates" in step:
        print(format_table(step["candidates"], step["perplexity"]["before"]))
    ppl, size, speed = step["perplexity"], step["size"], step["decode_tokens_per_s"]
    speed_text = speed if isinstance(speed, str) else \
        f"decode {speed['before']:.1f} -> {speed['after']:.1f} tok/s ({speed['speedup']:.2f}x)"
    print(f"{step['mode']} for {step['target']['name']}: perplexity {ppl['before']:.3f} -> {ppl['after']:.3f} "
          f"({ppl['increase']:+.2%}, limit {ppl['limit']:.2%}); model {size['model_bytes_before'] / 1e6:.1f} -> "
          f"{size['model_bytes_after'] / 1e6:.1f} MB; {speed_text}")
    print(f"wrote {args.output}")
    return 0


def _add_training_args(p: argparse.ArgumentParser, length_required: bool) -> None:
    g = p.add_argument_group("training")
    if length_required:
        length = g.add_mutually_exclusive_group(required=True)
        length.add_argument("--steps", type=int, help="optimizer steps to train")
        length.add_argument("--minutes", type=float, help="wall-clock budget for training (the steps are estimated "
                                                          "from the first few)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sequence; also the evaluation window (default 128)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine decay (default 3e-4)")
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature of the KL term (default 1)")
    g.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None,
                   help="matrix products in fp32, or bf16 autocast (auto, the default: bf16 where the CPU has it)")
    g.add_argument("--alpha", type=float, default=None,
                   help="weight of the teacher's soft targets; 1 - alpha goes to the next-token loss (default 0.5)")
    g.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 100)")
    g.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUTPUT.ckpt beside the output)")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folder after success")
    g.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in the checkpoint folder")
    g.add_argument("--seed", type=int, default=0, help="data order and initialisation seed (default 0)")
    p.add_argument("--eval-text", default=None,
                   help="held-out UTF-8 text for perplexity (default: edgelm's heldout.txt)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the step record as JSON")


def _train_config(args: argparse.Namespace, steps: int | None = None):
    from .train import TRAINING_ONLY, TrainConfig

    given = {k: getattr(args, k) for k in TRAINING_ONLY if getattr(args, k) is not None}  # else TrainConfig's
    return TrainConfig(steps=steps if steps is not None else args.steps,
                       minutes=None if steps is not None else args.minutes, batch_size=args.batch_size,
                       seq_len=args.seq_len, seed=args.seed, **given)


def _print_record(record: dict, as_json: bool, summary: str, output: str) -> None:
    if as_json:
        slim = json.loads(json.dumps(record))
        for part in (slim.get("training"), slim.get("recovery")):
            if part:
                part.pop("history", None)
        print(json.dumps(slim, indent=2))
    else:
        print(summary)
        print(f"wrote {output}")


def _configure_distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher model: HF folder, hub id or embedded:NAME")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student-layers", help="student depth N (layers spread over the teacher, kinds kept), or "
                                              "a list of teacher layers such as 0,3,5")
    who.add_argument("--student-config", help="config.json of another student of the same architecture")
    p.add_argument("--train-text", required=True, help="UTF-8 training text")
    p.add_argument("-o", "--output", required=True, help="student model folder to write (Hugging Face format)")
    _add_training_args(p, length_required=True)


@command("optimize distill", "Distill a teacher into a shallower student (KL on soft targets + next-token loss).",
         _configure_distill)
def run_distill(args: argparse.Namespace) -> int:
    from .distill import distill_model

    record = distill_model(args.teacher, args.output, args.train_text, _train_config(args),
                           student_layers=args.student_layers, student_config_file=args.student_config,
                           eval_text=args.eval_text, resume=args.resume, force=args.force,
                           progress=not (args.quiet or args.json), checkpoint_dir=args.checkpoint_dir,
                           keep_checkpoints=args.keep_checkpoints)
    ppl, t = record["perplexity"], record["training"]
    closed = "" if ppl["gap_closed"] is None else f", {100 * ppl['gap_closed']:.1f}% of the gap closed"
    _print_record(record, args.json,
                  f"student {len(record['student_layer_kinds'])} layers, {record['parameters']['student'] / 1e6:.1f}M "
                  f"parameters; {t['steps_done']} steps, {t['tokens']} tokens in {t['train_seconds']:.0f} s; held-out "
                  f"perplexity teacher {ppl['teacher']:.2f}, student {ppl['student_before']:.2f} -> "
                  f"{ppl['student_after']:.2f}{closed}", args.output)
    return 0


def _configure_prune(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model to prune: HF folder, hub id or embedded:NAME")
    p.add_argument("--heads", type=float, default=0.0, help="share of attention heads to remove, e.g. 0.25")
    p.add_argument("--mlp", type=float, default=0.0, help="share of MLP neurons to remove, e.g. 0.30")
    p.add_argument("--train-text", required=True, help="UTF-8 text for the importance scores and the recovery")
    p.add_argument("-o", "--output", required=True, help="pruned model folder to write (Hugging Face format)")
    p.add_argument("--importance", choices=["gradient", "random"], default="gradient",
                   help="how units are ranked: |dLoss/dmask| (default) or at random (a baseline)")
    p.add_argument("--scope", choices=["layer", "global"], default="layer",
                   help="remove the same share in every layer (default) or rank units across all layers")
    p.add_argument("--multiple", type=int, default=8, help="keep MLP widths at multiples of this (default 8)")
    p.add_argument("--score-batches", type=int, default=None,
                   help="gradient importance: batches used for the scores (default 16)")
    p.add_argument("--rounds", type=int, default=None,
                   help="gradient importance: prune in this many rounds, re-scoring the survivors after each "
                        "(default 4)")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="steps of recovery training, distilling from the unpruned model (default 0: none)")
    _add_training_args(p, length_required=False)


@command("optimize prune", "Remove attention heads and MLP neurons by measured importance, with optional recovery.",
         _configure_prune)
def run_prune(args: argparse.Namespace) -> int:
    from .prune import PruneConfig, prune_model
    from .train import TRAINING_ONLY

    given = {k: v for k, v in (("batches", args.score_batches), ("rounds", args.rounds)) if v is not None}
    pcfg = PruneConfig(heads=args.heads, mlp=args.mlp, importance=args.importance, scope=args.scope,
                       multiple=args.multiple, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                       **given)
    pcfg.check_given(given)
    if args.recover_steps < 0:
        from ..errors import InputError

        raise InputError(f"--recover-steps must be 0 or more, got {args.recover_steps}")
    unused = [f"--{k.replace('_', '-')}" for k in TRAINING_ONLY if getattr(args, k) is not None] + [
        flag for flag, on in (("--checkpoint-dir", args.checkpoint_dir), ("--keep-checkpoints", args.keep_checkpoints),
                              ("--resume", args.resume)) if on]
    if unused and not args.recover_steps:
        from ..errors import InputError

        raise InputError(f"{', '.join(unused)} set the recovery training, which runs only with --recover-steps N; "
                         "add --recover-steps, or leave them out")
    recover = _train_config(args, steps=args.recover_steps) if args.recover_steps else None
    record = prune_model(args.model, args.output, args.train_text, pcfg, recover=recover, eval_text=args.eval_text,
                         resume=args.resume, force=args.force, progress=not (args.quiet or args.json),
                         checkpoint_dir=args.checkpoint_dir, keep_checkpoints=args.keep_checkpoints)
    ppl, wb = record["perplexity"], record["weight_bytes"]
    _print_record(record, args.json,
                  f"heads {sum(record['layer_heads']['before'])} -> {sum(record['layer_heads']['after'])}, MLP "
                  f"neurons {sum(record['layer_inner']['before'])} -> {sum(record['layer_inner']['after'])}; weights "
                  f"{wb['before'] / 1e6:.1f} -> {wb['after'] / 1e6:.1f} MB; held-out perplexity {ppl['original']:.2f} "
                  f"-> {ppl['pruned']:.2f} pruned -> {ppl['final']:.2f} final ({ppl['increase']:+.1%})", args.output)
    return 0


def _configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="TOML recipe: model, train_text, and [[step]] tables (distill, prune, export, "
                                  "quantize); see edgelm/optimize/recipe.py or the README")
    p.add_argument("-o", "--output", required=True, help="folder to write: model/ (final artifact), steps/, report.*")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same recipe")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@command("optimize run", "Run a recipe (distill, prune, export, quantize) and report size, speed and perplexity "
         "after every step.", _configure_run)
def run_recipe_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .recipe import report_markdown, run_recipe

    report = run_recipe(args.recipe, args.output, force=args.force, resume=args.resume,
                        progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report_markdown(report))
    print(f"wrote {args.output}: final artifact {Path(args.output) / 'model'}, report.md, report.png")
    return 0
