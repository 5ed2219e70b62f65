"""Structured pruning benchmark: quality on the trained models, speed on the GPT-2 124M and gpt2-xl shapes.

    .venv/bin/python benchmarks/prune_bench.py                       # the committed run (about 40 minutes)
    .venv/bin/python benchmarks/prune_bench.py --parts quality       # only the trained models
    .venv/bin/python benchmarks/prune_bench.py --parts speed --speed-models gpt2   # only one speed row

Quality: the embedded GPT-2 and GPT-Neo (trained on the Austen novels) lose 25% of their attention
heads and 30% of their MLP neurons with ``edgelm optimize prune`` (gradient importance, global
ranking), then recover with a short distillation from the unpruned model on the training split
(benchmarks/data/austen-train.txt). Perplexity on edgelm/assets/text/heldout.txt, 128-token windows,
stride 64. The same prune with random importance and no recovery is the baseline.
Target: perplexity after recovery within +10% of the unpruned model.

Speed: random weights with the real gpt2 and gpt2-xl configurations (benchmarks/configs.py), pruned
to the same shares (importance does not matter for speed; the units are chosen at random), both
exported in fp32 by edgelm (the pruned one validated against PyTorch), decoded by edgelm's runtime
in one interleaved loop: batch 1, 32-token prompt, greedy, median of the rounds. The weight bytes
read per token are the fp32 parameters minus the position table (the tied embedding is read once,
by the LM head). Target: decode speed-up >= 90% of the reduction in weight bytes read per token.

Writes benchmarks/results/prune.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, machine, versions, write_results  # noqa: E402

TRAIN_TEXT = HERE / "data" / "austen-train.txt"
CACHE = HERE / ".cache"
HEADS, MLP = 0.25, 0.30
PPL_TARGET = 0.10
SPEED_TARGET = 0.90


def quality(models: list[str], recover_steps: int) -> list[dict]:
    from edgelm.optimize.prune import PruneConfig, prune_model
    from edgelm.optimize.train import TrainConfig

    rows = []
    for name in models:
        with tempfile.TemporaryDirectory(prefix="edgelm-prune-bench-") as tmp:
            print(f"== quality {name}: random importance, no recovery (baseline)", flush=True)
            baseline = prune_model(f"embedded:{name}", Path(tmp) / "random", TRAIN_TEXT,
                                   PruneConfig(heads=HEADS, mlp=MLP, importance="random"))
            print(f"== quality {name}: gradient importance, {recover_steps} recovery steps", flush=True)
            record = prune_model(f"embedded:{name}", Path(tmp) / "pruned", TRAIN_TEXT,
                                 PruneConfig(heads=HEADS, mlp=MLP),
                                 recover=TrainConfig(steps=recover_steps, precision="auto"))
        increase = record["perplexity"]["increase"]
        rows.append({"model": name, "record": record, "random_no_recovery": baseline["perplexity"],
                     "target": "PASS" if increase <= PPL_TARGET else "FAIL"})
    return rows


def bytes_per_token(model_dir: Path) -> int:
    """fp32 weight bytes read to decode one token: every parameter but the position table."""
    from edgelm.export.arch import arch_for
    from edgelm.export.checkpoint import open_checkpoint, read_config

    spec = arch_for(read_config(model_dir))
    ckpt = open_checkpoint(model_dir)
    positions = 4 * int(__import__("numpy").prod(ckpt.shape(spec.wpe)))
    return ckpt.nbytes_fp32() - positions


def prune_random_weights(source: Path, out: Path, seed: int = 0) -> dict:
    """The prune step's own functions, without the perplexity passes (meaningless on random weights)."""
    from edgelm.optimize.models import build_model, load_model, save_model
    from edgelm.optimize.prune import PruneConfig, choose_units, pruned_tensors

    model, config = load_model(source)
    keep_h, keep_n = choose_units(model, config, None, PruneConfig(heads=HEADS, mlp=MLP, importance="random", seed=seed))
    new_config, tensors = pruned_tensors(model, config, keep_h, keep_n)
    del model
    gc.collect()
    pruned = build_model(new_config, tensors)
    del tensors
    out.mkdir(parents=True, exist_ok=True)
    save_model(pruned, new_config, out, source, [{"name": "prune", "importance": "random", "heads": HEADS,
                                                  "mlp": MLP}])
    return new_config


def speed(models: list[str], new_tokens: int, repeats: int) -> list[dict]:
    from configs import MODELS
    from random_checkpoint import ensure_model_folder

    from edgelm.export import export_model
    from edgelm.export.checkpoint import release_memory
    from edgelm.optimize.measure import MeasureConfig, decode_speeds

    rows = []
    for name in models:
        source = CACHE / name
        cfg_hf = MODELS[name][1]
        ensure_model_folder(cfg_hf, source)
        work = CACHE / "prune"
        pruned_dir, art_full, art_pruned = work / f"{name}-pruned", work / f"{name}-onnx", work / f"{name}-pruned-onnx"
        print(f"== speed {name}: pruning {HEADS:.0%} of heads, {MLP:.0%} of MLP neurons", flush=True)
        if not (pruned_dir / "config.json").is_file():
            prune_random_weights(source, pruned_dir)
            release_memory()
        new_config = json.loads((pruned_dir / "config.json").read_text())
        for folder, art, validate in ((source, art_full, False), (pruned_dir, art_pruned, True)):
            if not (art / "manifest.json").is_file():
                print(f"== speed {name}: exporting {folder.name}", flush=True)
                export_model(str(folder), art, force=True, validate=validate)
                release_memory()
        validation = json.loads((art_pruned / "manifest.json").read_text())["validation"]
        cfg = MeasureConfig(new_tokens=new_tokens, repeats=repeats)
        prompt = list(range(1000, 1032))
        print(f"== speed {name}: decoding {new_tokens} tokens x {repeats} rounds, interleaved", flush=True)
        speeds = decode_speeds({"original": art_full, "pruned": art_pruned}, prompt, cfg, progress=True)
        b_full, b_pruned = bytes_per_token(source), bytes_per_token(pruned_dir)
        reduction = b_full / b_pruned
        speedup = speeds["pruned"]["tokens_per_s"] / speeds["original"]["tokens_per_s"]
        rows.append({"model": name, "heads": {"before": cfg_hf["n_head"] * cfg_hf["n_layer"],
                                              "after": sum(new_config["edgelm_layer_heads"])},
                     "mlp_neurons_after": sum(new_config["edgelm_layer_inner"]),
                     "bytes_per_token": {"original": b_full, "pruned": b_pruned}, "byte_reduction": round(reduction, 4),
                     "decode_tokens_per_s": {k: v["tokens_per_s"] for k, v in speeds.items()},
                     "decode_runs": {k: v["runs"] for k, v in speeds.items()}, "speedup": round(speedup, 4),
                     "speedup_share_of_reduction": round(speedup / reduction, 4),
                     "pruned_validation": validation.get("status"),
                     "target": "PASS" if speedup >= SPEED_TARGET * reduction else "FAIL"})
        print(f"   bytes/token {b_full / 1e6:.0f} -> {b_pruned / 1e6:.0f} MB ({reduction:.3f}x); decode "
              f"{speeds['original']['tokens_per_s']:.1f} -> {speeds['pruned']['tokens_per_s']:.1f} tok/s "
              f"({speedup:.3f}x = {speedup / reduction:.0%} of the reduction)", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Structured pruning: {HEADS:.0%} of heads, {MLP:.0%} of MLP neurons", "",
             f"`.venv/bin/python {result['command']}` on {result['machine']['cpu']} ({result['machine']['cpus']} "
             f"cores, {result['machine']['isa']}), commit {result['commit']}, {result['created']}, load average at "
             f"start {result['machine']['load_average_at_start']:.2f}.", ""]
    if result.get("quality"):
        lines += ["## Quality (trained embedded models, held-out text, 128-token windows, stride 64)", "",
                  "| model | heads | MLP neurons | weights (MB) | ppl unpruned | pruned, random units, no recovery "
                  "| pruned by gradient | after recovery | recovery steps | increase | target (<= +10%) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["quality"]:
            r, p = row["record"], row["record"]["perplexity"]
            lines.append(
                f"| {row['model']} | {sum(r['layer_heads']['before'])} -> {sum(r['layer_heads']['after'])} | "
                f"{sum(r['layer_inner']['before'])} -> {sum(r['layer_inner']['after'])} | "
                f"{r['weight_bytes']['before'] / 1e6:.1f} -> {r['weight_bytes']['after'] / 1e6:.1f} | {p['original']:.2f} | "
                f"{row['random_no_recovery']['pruned']:.2f} | {p['pruned']:.2f} | {p['final']:.2f} | "
                f"{r['recovery']['steps_done']} | {p['increase']:+.1%} | {row['target']} |")
        lines += ["", "These models are 16M parameters, 12.9M of them the tied embedding, so the weight saving "
                  "here is small; the speed rows below use the real shapes.", ""]
    if result.get("speed"):
        lines += ["## Speed (random weights, real shapes, edgelm runtime fp32, batch 1, interleaved rounds)", "",
                  "| shape | heads | weight bytes / token (MB) | reduction | decode tok/s original | pruned | "
                  "speed-up | share of reduction | pruned export validated | target (>= 90%) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["speed"]:
            b, s = r["bytes_per_token"], r["decode_tokens_per_s"]
            lines.append(f"| {r['model']} | {r['heads']['before']} -> {r['heads']['after']} | {b['original'] / 1e6:.0f} -> "
                         f"{b['pruned'] / 1e6:.0f} | {r['byte_reduction']:.3f}x | {s['original']:.2f} | {s['pruned']:.2f} | "
                         f"{r['speedup']:.3f}x | {r['speedup_share_of_reduction']:.0%} | {r['pruned_validation']} | "
                         f"{r['target']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if result.get("quality"):
        a = axes[0]
        names = [r["model"] for r in result["quality"]]
        series = (("unpruned", lambda r: r["record"]["perplexity"]["original"]),
                  ("random units", lambda r: r["random_no_recovery"]["pruned"]),
                  ("gradient importance", lambda r: r["record"]["perplexity"]["pruned"]),
                  ("+ recovery", lambda r: r["record"]["perplexity"]["final"]))
        for k, (label, get) in enumerate(series):
            a.bar([i + (k - 1.5) * 0.2 for i in range(len(names))], [get(r) for r in result["quality"]], 0.2, label=label)
        a.set_xticks(range(len(names)), names)
        a.set_ylabel("held-out perplexity")
        a.set_title("Quality after pruning 25% heads, 30% MLP")
        a.legend(fontsize=8)
    if result.get("speed"):
        b = axes[1]
        names = [r["model"] for r in result["speed"]]
        b.bar([i - 0.2 for i in range(len(names))], [r["byte_reduction"] for r in result["speed"]], 0.4,
              label="weight-byte reduction")
        b.bar([i + 0.2 for i in range(len(names))], [r["speedup"] for r in result["speed"]], 0.4,
              label="measured decode speed-up")
        b.axhline(1.0, color="gray", lw=0.8)
        b.set_xticks(range(len(names)), names)
        b.set_ylabel("x (pruned / original)")
        b.set_title("Speed: edgelm runtime, fp32, batch 1")
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="quality,speed")
    ap.add_argument("--quality-models", default="gpt2,gpt-neo")
    ap.add_argument("--speed-models", default="gpt2,gpt2-xl")
    ap.add_argument("--recover-steps", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "prune"), help="path stem of the result files")
    args = ap.parse_args()
    parts = args.parts.split(",")
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "versions": versions(), "commit": commit(),
              "command": " ".join(["benchmarks/prune_bench.py", *sys.argv[1:]])}
    if "quality" in parts:
        result["quality"] = quality(args.quality_models.split(","), args.recover_steps)
        write_results(Path(args.out), result, markdown, plot)  # kept if the speed part fails
    if "speed" in parts:
        result["speed"] = speed(args.speed_models.split(","), args.new_tokens, args.repeats)
    print(write_results(Path(args.out), result, markdown, plot))
    rows = result.get("quality", []) + result.get("speed", [])
    return 0 if all(r["target"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
