"""``edgelm eval`` (and, as they land, the ``edgelm optimize`` steps)."""

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
