"""Decode speed on the GPU: edgelm's runtime (fp16 export, CUDA provider, device-resident KV cache)
against PyTorch generate (fp16, CUDA), on random-weight models with the real configurations.

    python benchmarks/cuda_bench.py --out $OUT/cuda.json     # scripts/cuda_check.sh device runs this

Needs onnxruntime-gpu with a CUDA provider that starts, and torch with CUDA. Batch 1 and 8, a
32-token prompt, 128 greedy new tokens (EOS ignored), both systems in shuffled order within each
repeat; ratios are taken within a repeat, then the median. The GPU's memory bandwidth is measured in
the same run (a device-to-device copy of 1 GiB through torch, bytes read and written, best of 10);
a model's ceiling at batch 1 is that bandwidth / the fp16 weight bytes read per token. Writes --out
and the .md beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from configs import MODELS  # noqa: E402
from random_checkpoint import ensure_model_folder  # noqa: E402
import runtime_bench  # noqa: E402

CACHE = runtime_bench.CACHE


def gpu_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write), best of 10."""
    import torch

    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(11):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best / 1e9


class Edgelm(runtime_bench.Edgelm):
    """The fp16 export (MatMul layout, right padding) on the CUDA provider."""

    def __init__(self, model_dir: Path, name: str):
        from edgelm.runtime import Generator

        self.gen = Generator.load(runtime_bench.cached_artifact(model_dir, name, "matmul", "fp16"), provider="cuda")


class PyTorch(runtime_bench.PyTorch):
    device = "cuda"

    def __init__(self, model_dir: Path, name: str):
        import torch
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float16)
        self.model = self.model.to("cuda").eval()


SYSTEMS = {"edgelm": Edgelm, "pytorch": PyTorch}


def bench_model(name: str, batches: list[int], repeats: int, prompt_len: int, new_tokens: int,
                bandwidth: float) -> list[dict]:
    hub_id, cfg = MODELS[name]
    model_dir = CACHE / name
    ensure_model_folder(cfg, model_dir)
    per_token = runtime_bench.weight_bytes_per_token(cfg) // 2  # fp16
    systems = {}
    for s in SYSTEMS:
        print(f"  loading {s} for {name}", flush=True)
        systems[s] = SYSTEMS[s](model_dir, name)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        prompts = rng.integers(0, 50000, size=(batch, prompt_len)).tolist()
        samples = {s: [] for s in systems}
        for s in systems:  # warm-up, untimed
            systems[s].run(prompts, 4)
        for r in range(repeats):
            for s in [list(systems)[i] for i in rng.permutation(len(systems))]:
                samples[s].append(systems[s].run(prompts, new_tokens))
                print(f"  {name} b{batch} {s} rep {r}: ttft {samples[s][-1][0] * 1000:.1f} ms, "
                      f"decode {samples[s][-1][1]:.1f} tok/s", flush=True)
        ceiling = bandwidth * 1e9 / per_token
        for s in systems:
            ttfts, rates = zip(*samples[s])
            rows.append({
                "model": name, "mirrors": hub_id, "system": s, "batch": batch, "prompt_tokens": prompt_len,
                "new_tokens": new_tokens, "repeats": repeats, "dtype": "fp16",
                "decode_tokens_per_s": float(np.median(rates)), "decode_tokens_per_s_all": list(rates),
                "time_to_first_token_s": float(np.median(ttfts)),
                "vs_pytorch": float(np.median([x / p for x, (_, p) in zip(rates, samples["pytorch"])])),
                "weight_bytes_per_token": per_token, "ceiling_tokens_per_s": ceiling,
                "fraction_of_ceiling": float(np.median(rates)) / ceiling if batch == 1 else None,
            })
    return rows


def write_report(data: dict, out: Path) -> None:
    lines = [
        "# CUDA benchmark: edgelm's runtime against PyTorch generate (fp16)", "",
        f"GPU: {data['gpu']}. Date: {data['date']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in data["versions"].items()), "",
        f"Command: `{data['command']}`", "",
        f"GPU memory bandwidth: {data['bandwidth_gbps']:.0f} GB/s (1 GiB device-to-device copy, read + write, "
        "best of 10). Ceiling at batch 1: that bandwidth / fp16 weight bytes per token. Random weights, real "
        "configurations, prompt of 32 random tokens, greedy, EOS ignored, median over repeats; "
        "'vs PyTorch' is the median of per-repeat ratios.", "",
        "| model | batch | system | decode tok/s | TTFT ms | vs PyTorch | of ceiling |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        share = f"{r['fraction_of_ceiling']:.0%}" if r["fraction_of_ceiling"] is not None else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['system']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['time_to_first_token_s'] * 1000:.1f} | {r['vs_pytorch']:.2f}x | {share} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,gpt-neo-125M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--out", default=str(HERE / "results" / "cuda.json"))
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown or args.repeats < 1 or args.new_tokens < 2:
        p.error(f"models are {', '.join(MODELS)}; --repeats at least 1, --new-tokens at least 2")
    import torch

    from edgelm.export.pipeline import versions

    if not torch.cuda.is_available():
        p.error("torch sees no GPU: run this on a machine with an NVIDIA GPU")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bandwidth = gpu_bandwidth()
    print(f"GPU bandwidth: {bandwidth:.0f} GB/s", flush=True)
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
            "gpu": torch.cuda.get_device_name(0), "versions": versions(), "bandwidth_gbps": bandwidth, "rows": []}
    for name in args.models.split(","):
        data["rows"] += bench_model(name, [int(b) for b in args.batches.split(",")], args.repeats,
                                    args.prompt_len, args.new_tokens, bandwidth)
        out.write_text(json.dumps(data, indent=2) + "\n")
        write_report(data, out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
