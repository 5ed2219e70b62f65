"""``edgelm export``: its arguments and its run function (heavy imports happen inside run)."""

from __future__ import annotations

import argparse
import json

from ..cli import command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id (gpt2, EleutherAI/gpt-neo-125M), local Hugging Face folder, "
                                 "or embedded:gpt2 / embedded:gpt-neo (the small models shipped with edgelm)")
    p.add_argument("-o", "--output", required=True, help="artifact folder to create")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="weights and activations; fp16 is meant for CUDA (default fp32)")
    p.add_argument("--backend", choices=["builder", "optimum"], default="builder",
                   help="builder: edgelm's fused graph (default); optimum: optimum-onnx's exporter")
    p.add_argument("--linear-layout", choices=["auto", "conv", "matmul", "packed"], default="auto",
                   help="projections as 1x1 convolutions (conv: faster fp32 decode on CPU than MatMul), MatMul, "
                        "or packed: edgelm's own operator, the fastest fp32 decode on CPU, runnable only where "
                        "edgelm's runtime is installed; auto: conv for fp32, matmul for fp16 (default auto)")
    p.add_argument("--atol", type=float, default=None,
                   help="max |difference| to PyTorch allowed per output (default 2e-3 for fp32, 5e-2 for fp16)")
    p.add_argument("--rtol", type=float, default=None,
                   help="plus this fraction of |PyTorch value| (default 1e-3 for fp32, 1e-2 for fp16)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch (not recommended)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


@command("export", "Export a GPT-2 or GPT-Neo model to a validated ONNX artifact folder.", _configure)
def run(args: argparse.Namespace) -> int:
    from .pipeline import export_model

    manifest = export_model(args.model, args.output, dtype=args.dtype,
                            backend=args.backend, atol=args.atol, rtol=args.rtol, force=args.force,
                            validate=not args.no_validate, progress=not args.json,
                            linear_layout=args.linear_layout)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    v = manifest["validation"]
    size = sum(f["bytes"] for f in manifest["files"].values())
    ops = manifest["graph"]["operators"]
    print(f"wrote {args.output}: {size / 1e6:.1f} MB, {manifest['steps'][-1]['seconds']:.1f} s, "
          f"peak RSS {manifest['steps'][-1]['peak_rss_bytes'] / 1e9:.2f} GB")
    print("fused operators: " + ", ".join(f"{k} {v}" for k, v in ops.items()
                                           if k in ("GroupQueryAttention", "CachedAttention", "SkipLayerNormalization", "FastGelu",
                                                    "Attention", "MultiHeadAttention", "Softmax")))
    if v["status"] == "passed":
        worst = max(v["max_abs_diff"].items(), key=lambda kv: kv[1])
        rule = f"atol {v['atol']:g} + rtol {v['rtol']:g}"
        if "torch_fp16_max_abs_diff" in v:
            from .validate import FP16_FACTOR

            rule += f" or within {FP16_FACTOR:g}x PyTorch fp16's own distance from fp32 (its largest: {worst[0]} " \
                    f"{v['torch_fp16_max_abs_diff'][worst[0]]:.3g})"
        print(f"validated against PyTorch: {len(v['max_abs_diff'])} outputs within {rule} "
              f"(largest: {worst[0]} {worst[1]:.3g})")
    else:
        print(f"not validated: {v['reason']}")
    return 0


def _configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", help="artifact folders made by 'edgelm export' or 'edgelm optimize'")


@command("verify", "Check artifact folders against their manifests: every file there, with its size and sha256.",
         _configure_verify)
def run_verify(args: argparse.Namespace) -> int:
    import sys

    from ..manifest import read_manifest

    for folder in args.artifacts:
        files = read_manifest(folder, verify_checksums=True, progress=sys.stderr.isatty())["files"]
        print(f"{folder}: ok, {len(files)} files, {sum(f['bytes'] for f in files.values()) / 1e6:.1f} MB, "
              "sha256 verified")
    return 0
