"""``edgelm eval`` and the ``edgelm optimize`` steps (``optimize quantize``)."""

from __future__ import annotations

import argparse
import json

from ..cli import command


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="artifact folder (ONNX Runtime), or a model: hub id, HF folder, embedded:NAME (PyTorch)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--stride", type=int, default=None, help="tokens the window advances (default: half the window)")
    p.add_argument("--max-length", type=int, default=None, help="window length (default: context, at most 1024)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
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
    p.add_argument("--algorithm", default="rtn", choices=["rtn", "gptq"],
                   help="weight-only modes: round-to-nearest or GPTQ (calibrated) (default rtn)")
    p.add_argument("--block-size", type=int, default=32, help="weight-only modes: values per scale (default 32)")
    p.add_argument("--embeddings", default="quantize", choices=["keep", "quantize"],
                   help="the tied token embedding / LM head: quantize it too (default) or keep it fp32")
    p.add_argument("--smooth-alpha", type=float, default=0.5,
                   help="int8-static: SmoothQuant strength, 0 switches it off (default 0.5)")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-length", type=int, default=256, help="tokens per calibration window (default 256)")
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
    config = QuantizeConfig(mode=args.mode, target=args.target, algorithm=args.algorithm, block_size=args.block_size,
                            embeddings=args.embeddings, smooth_alpha=args.smooth_alpha,
                            calib_windows=args.calib_windows, calib_length=args.calib_length, max_ppl_increase=limit)
    measure = MeasureConfig(max_length=args.max_length, stride=args.stride, new_tokens=args.new_tokens,
                            repeats=args.repeats)
    progress = not (args.quiet or args.json)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k))
    try:
        manifest = quantize_artifact(args.artifact, args.output, config, measure, args.calib_text, args.eval_text,
                                     force=args.force, progress=progress, say=log)
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
