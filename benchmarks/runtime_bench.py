"""Decode speed of edgelm's runtime against Optimum's ORTModelForCausalLM and PyTorch generate.

    .venv/bin/python benchmarks/runtime_bench.py                       # the committed run
    .venv/bin/python benchmarks/runtime_bench.py --models gpt2 --repeats 2 --new-tokens 64

Random-weight models with the real configurations (benchmarks/configs.py), batch 1, a 32-token
prompt, 128 greedy new tokens (EOS ignored), systems in shuffled order within each repeat. The
memory bandwidth is measured in the same run, between every two repeats (all cores read a 1 GiB
buffer, best of 3 passes of the read probe's readers); a repeat's ceiling is the higher bandwidth
around it / weight bytes read per token (every weight except the position table, which is only
gathered). Ratios are taken within a repeat, then the median. The memory-read system is no model:
it reads a step's weight bytes per step, the speed of memory measured as a decode is (batch 1).
Writes --out (default benchmarks/results/runtime.json) and the .md and .png beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine  # noqa: E402
from configs import MODELS  # noqa: E402
from random_checkpoint import ensure_model_folder  # noqa: E402

from edgelm.bench.machine import measure_bandwidth  # noqa: E402  (the ceiling edgelm bench measures)

CACHE = HERE / ".cache"
RESULTS = HERE / "results"
SMALL = {"gpt2", "gpt-neo-125M"}


def weight_bytes_per_token(cfg: dict) -> int:
    from random_checkpoint import param_count

    hidden = cfg.get("n_embd") or cfg["hidden_size"]
    positions = cfg.get("n_positions") or cfg["max_position_embeddings"]
    return 4 * (param_count(cfg) - hidden * positions)


def screened_bytes_per_token(cfg: dict) -> int:
    """What one greedy step reads where the runtime screens the LM head (edgelm/runtime/native/screen.c):
    weight_bytes_per_token less the fp32 head, plus its int8 copy, the screen's 6 floats per column
    (scale and bounds) and the estimates; the few fp32 panels that may hold the argmax (about 4 a step
    on these shapes) counted as 4."""
    hidden = cfg.get("n_embd") or cfg["hidden_size"]
    vocab = cfg["vocab_size"]
    return weight_bytes_per_token(cfg) - 4 * vocab * hidden + vocab * hidden + 7 * 4 * vocab + 4 * 64 * hidden


# -- systems ------------------------------------------------------------------------------------
def cached_artifact(model_dir: Path, name: str, layout: str, dtype: str = "fp32") -> Path:
    """The builder export of ``model_dir`` in ``layout`` and ``dtype`` under .cache/artifacts, exported
    when the cached one is missing, damaged or in another layout or dtype."""
    from edgelm.errors import EdgelmError
    from edgelm.export import export_model
    from edgelm.manifest import read_manifest

    art = CACHE / "artifacts" / (f"{name}-builder-{layout}" + ("" if dtype == "fp32" else f"-{dtype}"))
    try:
        graph = read_manifest(art)["graph"]
        current = (graph.get("linear_layout"), graph.get("dtype"))
    except EdgelmError:
        current = None
    if current != (layout, dtype):
        export_model(str(model_dir), art, dtype=dtype, force=True, progress=False, linear_layout=layout)
    return art


def load_as_exported(folder: Path, **kwargs):
    """A Generator that runs ``folder``'s graph as exported: ONNX Runtime's kernels for the conv and
    matmul layouts (the runtime's default would turn them into the packed graph), edgelm's for packed."""
    from edgelm.manifest import read_manifest
    from edgelm.runtime import Generator
    from edgelm.runtime.artifact import kernels_as_exported

    return Generator.load(folder, kernels=kernels_as_exported(read_manifest(folder)), **kwargs)


class Edgelm:
    """edgelm's runtime as a user gets it: the default export (fp32: projections as 1x1 Conv), which
    the runtime's default kernels (auto) run as the packed graph on edgelm's operators."""

    name = "edgelm"
    layout = "conv"
    kernels = "auto"

    def __init__(self, model_dir: Path, name: str):
        from edgelm.runtime import Generator

        self.gen = Generator.load(cached_artifact(model_dir, name, self.layout), kernels=self.kernels)
        assert self.gen.art.kernels == ("onnxruntime" if self.kernels == "onnxruntime" else "edgelm")

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        from edgelm.runtime import SamplingConfig

        res = self.gen.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False))
        t = res[0].timings
        return t["time_to_first_token_s"], t["decode_tokens_per_s"]


class EdgelmOrt(Edgelm):
    """The default export on ONNX Runtime's own kernels (--kernels onnxruntime): the graph any ONNX
    Runtime host runs, with edgelm's generation loop."""

    name = "edgelm-ort"
    kernels = "onnxruntime"


class EdgelmMatMul(EdgelmOrt):
    """The MatMul layout (what quantizers take) on ONNX Runtime's kernels: shows what the Conv layout gains."""

    name = "edgelm-matmul"
    layout = "matmul"


class EdgelmPacked(Edgelm):
    """The same runtime on the packed layout: every projection is edgelm's PackedLinear operator."""

    name = "edgelm-packed"
    layout = "packed"


class _HFGenerate:
    model = None
    device = "cpu"  # where the model's inputs go; "cuda" also waits for the GPU before each clock read

    def _clock(self) -> float:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        import torch

        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        kw = dict(do_sample=False, pad_token_id=50256, eos_token_id=None)
        with torch.inference_mode():
            t = self._clock()
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, **kw)
            ttft = self._clock() - t
            t = self._clock()
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, **kw)
            total = self._clock() - t
        assert out.shape[1] == ids.shape[1] + new_tokens
        return ttft, (new_tokens - 1) * ids.shape[0] / max(total - ttft, 1e-9)


class Optimum(_HFGenerate):
    name = "optimum"

    def __init__(self, model_dir: Path, name: str):
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTModelForCausalLM

        out = CACHE / "artifacts" / f"{name}-optimum-hf"
        if not (out / "model.onnx").is_file():
            main_export(str(model_dir), out, task="text-generation-with-past", do_validation=False)
        self.model = ORTModelForCausalLM.from_pretrained(out, use_io_binding=True)


class PyTorch(_HFGenerate):
    name = "pytorch"

    def __init__(self, model_dir: Path, name: str):
        import torch
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


class MemoryRead:
    """No model: each step reads as many bytes as a decode step's weights, with the read probe's
    fastest reader (interleaved chunks, every core): the speed of memory, timed the way a decode is
    and in the same minutes. Its share of the ceiling shows how much of the ceiling the method leaves
    reachable on this machine (the ceiling is the best pass of several; a run of steps also meets
    the machine's dips)."""

    name = "memory-read"

    def __init__(self, model_dir: Path, name: str):
        from concurrent.futures import ThreadPoolExecutor

        from edgelm.bench.machine import read_kernels

        self.threads = os.cpu_count() or 1
        self.buf = np.ones(weight_bytes_per_token(MODELS[name][1]) // 4, dtype=np.float32)
        self.pool = ThreadPoolExecutor(self.threads)
        self.reader = read_kernels()[-1]  # interleaved chunks where edgelm's library is built

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        from edgelm.bench.machine import timed_read

        times = [timed_read(self.pool, self.threads, self.reader, self.buf) for _ in range(new_tokens)]
        return times[0], (new_tokens - 1) * len(prompts) / sum(times[1:])


SYSTEMS = {"edgelm": Edgelm, "edgelm-packed": EdgelmPacked, "edgelm-ort": EdgelmOrt, "edgelm-matmul": EdgelmMatMul,
           "optimum": Optimum,
           "pytorch": PyTorch, "memory-read": MemoryRead}


def bench_model(name: str, systems: list[str], batches: list[int], repeats: int, prompt_len: int,
                new_tokens: int, rows: list, save) -> None:
    """Each repeat runs every system once (shuffled order) between two bandwidth measurements.

    Absolute speeds drift by +-20% within minutes on these shared machines, so every ratio is
    taken within a repeat: a system's speed against Optimum's in the same repeat, and against the
    ceiling from the bandwidth measured just before and after it (the higher of the two), then
    the median over repeats.
    """
    hub_id, cfg = MODELS[name]
    model_dir = CACHE / name
    ensure_model_folder(cfg, model_dir)
    per_token = weight_bytes_per_token(cfg)
    interleave = name in SMALL  # big models: one system in memory at a time
    rng = np.random.default_rng(0)
    loaded = {}

    def load(sys_name):
        if sys_name not in loaded:
            print(f"  loading {sys_name} for {name}", flush=True)
            loaded[sys_name] = SYSTEMS[sys_name](model_dir, name)
        return loaded[sys_name]

    order = [systems] if interleave else [[s] for s in systems]
    for listed in order:
        for batch in batches:
            group = [s for s in listed if batch == 1 or s != "memory-read"]  # it reads one row's weights a step
            prompts = rng.integers(0, 50000, size=(batch, prompt_len)).tolist()
            samples = {s: [] for s in group}
            bandwidths = [measure_bandwidth(passes=3)]
            for s in group:  # warm-up, untimed (also after every bandwidth measurement)
                load(s).run(prompts, 4)
            for r in range(repeats):
                for s in [group[i] for i in rng.permutation(len(group))]:
                    samples[s].append(load(s).run(prompts, new_tokens))
                    print(f"  {name} b{batch} {s} rep {r}: ttft {samples[s][-1][0] * 1000:.0f} ms, "
                          f"decode {samples[s][-1][1]:.1f} tok/s", flush=True)
                bandwidths.append(measure_bandwidth(passes=3))
                for s in group:  # the first run after the 1 GiB read is slow (pages come back): untimed
                    load(s).run(prompts, 2)
            ceilings = [max(a, b) * 1e9 / per_token for a, b in zip(bandwidths, bandwidths[1:])]
            print(f"  bandwidth around the repeats: {', '.join(f'{b:.1f}' for b in bandwidths)} GB/s", flush=True)
            for s in group:
                ttfts, rates = zip(*samples[s])
                rows.append({
                    "model": name, "mirrors": hub_id, "system": s, "batch": batch, "prompt_tokens": prompt_len,
                    "new_tokens": new_tokens, "repeats": repeats,
                    "decode_tokens_per_s": float(np.median(rates)), "decode_tokens_per_s_all": list(rates),
                    "time_to_first_token_s": float(np.median(ttfts)),
                    "weight_bytes_per_token": per_token, "interleaved": interleave,
                    "bandwidth_gbps_around_repeats": bandwidths,
                    "ceiling_tokens_per_s": float(np.median(ceilings)),
                    "fraction_of_ceiling": (float(np.median([x / c for x, c in zip(rates, ceilings)]))
                                            if batch == 1 else None),
                })
                if batch == 1 and getattr(getattr(load(s), "gen", None), "screens", False):
                    # the same speeds against the ceiling of the bytes it reads (fewer: the LM head's screen)
                    own = screened_bytes_per_token(cfg)
                    rows[-1]["bytes_read_per_token"] = own
                    rows[-1]["fraction_of_own_ceiling"] = float(np.median(
                        [x * own / (max(a, b) * 1e9) for x, a, b in zip(rates, bandwidths, bandwidths[1:])]))
            for ref in ("optimum", "memory-read"):  # speed ratios within each repeat, then the median
                if interleave and ref in group:
                    key = "vs_" + ref.replace("-", "_")
                    for row in rows[-len(group):]:
                        per_repeat = [x / o for x, (_, o) in zip(row["decode_tokens_per_s_all"], samples[ref])]
                        row[key + "_per_repeat"] = per_repeat
                        row[key] = float(np.median(per_repeat))
            save()
        if not interleave:
            loaded.clear()
            gc.collect()


def set_ceilings(data: dict) -> None:
    """The run's best bandwidth, and each batch-1 row's speed against it (the least flattering ceiling)."""
    ours = [r for r in data["rows"] if not r.get("earlier_run")]
    data["bandwidth_gbps"] = max(data["bandwidth_samples_gbps"]
                                 + [b for r in ours for b in r.get("bandwidth_gbps_around_repeats", [])])
    for r in ours:
        if r["batch"] == 1:
            r["fraction_of_best_ceiling"] = (r["decode_tokens_per_s"] * r["weight_bytes_per_token"]
                                             / (data["bandwidth_gbps"] * 1e9))


def write_report(data: dict, out: Path) -> None:
    rows = data["rows"]
    lines = [
        "# Runtime benchmark: decode speed against Optimum and PyTorch (CPU, fp32)",
        "",
        f"Machine: {data['machine'].get('cpu', 'CPU not recorded')} ({data['machine'].get('isa') or 'no AVX2'}), "
        f"{data['machine']['cpus']} cores, {data['machine']['ram_gb']:.0f} GB RAM, "
        f"{data['machine']['platform']}. Date: {data['date']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
        "",
        f"Command: `{data['command']}`",
        "",
        "Memory bandwidth: all cores reading a 1 GiB buffer with the read probe's readers, best of several passes "
        "(edgelm.bench.machine.measure_bandwidth), measured between every two repeats. A row's ceiling is "
        "bandwidth / weight bytes read per token; 'of ceiling' is the median over repeats of the speed "
        "against the higher of the two measurements around that repeat. Speeds drift by +-20% within "
        "minutes on this shared machine, so ratios are taken within a repeat (systems in shuffled order). "
        f"'of best' compares the median speed with the best bandwidth seen in the whole run "
        f"(**{data['bandwidth_gbps']:.1f} GB/s**; all measurements in runtime.json), the least flattering reading."
        + "".join(f" Earlier run merged in: `{e.get('command')}` ({e.get('date')}, {e.get('bandwidth_gbps', 0):.1f} GB/s)."
                  for e in data.get("earlier_runs", [])),
        "Random weights, real configurations; prompt of 32 random tokens; greedy; EOS ignored; "
        "median over repeats; systems interleaved within a repeat for the 125M shapes "
        "(one system in memory at a time for the large ones). edgelm: the default fp32 export "
        "(projections as 1x1 Conv) as the runtime runs it by default (`--kernels auto`): turned into the packed "
        "graph at load, weights in process memory; edgelm-packed: `--linear-layout packed` "
        "(every projection and the LM head as edgelm's PackedLinear operator, weights in 16-column panels, "
        "mapped from the artifact's file); edgelm-ort: the default export on ONNX Runtime's own kernels "
        "(`--kernels onnxruntime`, NCHWc convolutions); edgelm-matmul: MatMul projections on ONNX Runtime's "
        "kernels. memory-read: no model, each step reads as many bytes as a decode "
        "step's weights with the read probe's fastest reader on every core (the speed of memory under the same noise). "
        "The ceiling divides by the fp32 weights' bytes; where edgelm's runtime screens the LM head (greedy rows on "
        "its kernels: an int8 copy gives every logit an estimate with a proven bound, and only the panels that may "
        "hold the argmax are computed in fp32, the same tokens), it reads fewer, and the verdicts below also give "
        "its speed against the ceiling of what it reads.",
        "",
        "| model | batch | system | decode tok/s | TTFT ms | vs Optimum | vs PyTorch | ceiling tok/s | of ceiling "
        "| of best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["model"], r["batch"], r["system"]): r for r in rows}
    for r in rows:
        opt = by.get((r["model"], r["batch"], "optimum"))
        pt = by.get((r["model"], r["batch"], "pytorch"))
        ratio = r.get("vs_optimum") or (r["decode_tokens_per_s"] / opt["decode_tokens_per_s"] if opt else None)
        vs_opt = f"{ratio:.2f}x" if ratio else "n/a"
        vs_pt = f"{r['decode_tokens_per_s'] / pt['decode_tokens_per_s']:.2f}x" if pt else "n/a"
        frac = f"{r['fraction_of_ceiling'] * 100:.0f}%" if r.get("fraction_of_ceiling") else ""
        best = f"{r['fraction_of_best_ceiling'] * 100:.0f}%" if r.get("fraction_of_best_ceiling") else ""
        ttft = "n/a" if r["system"] == "memory-read" else f"{r['time_to_first_token_s'] * 1000:.0f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['system']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{ttft} | {vs_opt} | {vs_pt} | "
                     f"{r['ceiling_tokens_per_s']:.1f} | {frac} | {best} |")
    lines += ["", "Targets (issue 3, CPU, fp32, batch 1): edgelm decode >= 1.9x Optimum and >= 90% of the ceiling "
              "(edgelm: the default export and kernels; edgelm-packed: the packed export; edgelm-ort: the default export "
              "on ONNX Runtime's kernels).", ""]
    for r in rows:
        if r["system"] not in ("edgelm", "edgelm-packed", "edgelm-ort") or r["batch"] != 1:
            continue
        opt = by.get((r["model"], 1, "optimum"))
        ratio = r.get("vs_optimum") or (r["decode_tokens_per_s"] / opt["decode_tokens_per_s"] if opt else None)
        verdict_opt = ("PASS" if ratio >= 1.9 else "FAIL") + f" ({ratio:.2f}x)" if ratio else "not measured"
        verdict_ceil = ("PASS" if r["fraction_of_ceiling"] >= 0.9 else "FAIL") + f" ({r['fraction_of_ceiling'] * 100:.0f}%)"
        own = ""
        if r.get("bytes_read_per_token"):
            own = (f" (of the fp32 weights' {r['weight_bytes_per_token'] / 1e6:.0f} MB per token, it reads "
                   f"{r['bytes_read_per_token'] / 1e6:.0f} MB: the LM head's screen; against the ceiling of what it "
                   f"reads, {r['fraction_of_own_ceiling'] * 100:.0f}%)")
        lines.append(f"- {r['model']} {r['system']}: vs Optimum {verdict_opt}; ceiling {verdict_ceil}{own}")
    for r in rows:
        if r["system"] != "memory-read" or r["batch"] != 1 or not r.get("fraction_of_ceiling"):
            continue
        ours = [f"{o['system']} {o['vs_memory_read'] * 100:.0f}%" for o in rows
                if o["model"] == r["model"] and o["batch"] == 1 and o.get("vs_memory_read")
                and o["system"].startswith("edgelm")]
        lines.append(f"- {r['model']}: memory-read, a pure read of a step's weight bytes timed like a decode, reaches "
                     f"{r['fraction_of_ceiling'] * 100:.0f}% of the ceiling; against its speed in the same repeats: "
                     + (", ".join(ours) or "not taken (this model's systems run one at a time, not interleaved; "
                                            "compare their shares of the ceiling above)"))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        _plot(rows, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no runtime.png", file=sys.stderr)


def _plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda k: (k[1], k[0]))
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4.2))
    width = 0.8 / len(systems)
    for j, s in enumerate(systems):
        vals = [next((r["decode_tokens_per_s"] for r in rows if (r["model"], r["batch"]) == k and r["system"] == s), 0)
                for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=s)
    for i, k in enumerate(keys):
        ceil = next(r["ceiling_tokens_per_s"] * k[1] for r in rows if (r["model"], r["batch"]) == k)
        if k[1] == 1:
            ax.plot([i - width / 2, i + 0.8 - width / 2], [ceil, ceil], "k--", lw=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{m}\nbatch {b}" for m, b in keys], fontsize=8)
    ax.set_ylabel("decode tokens / s (higher is better)")
    ax.set_title("fp32 decode on CPU; dashed: memory-bandwidth ceiling (batch 1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,gpt-neo-125M,gpt2-xl,gpt-neo-2.7B")
    p.add_argument("--systems", default="edgelm,edgelm-packed,edgelm-ort,optimum,pytorch,memory-read")
    p.add_argument("--big-systems", default="edgelm,edgelm-packed,edgelm-ort,pytorch,memory-read",
                   help="systems for models outside the 125M shapes (Optimum's export of 2.7B does not fit)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch8", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure batch 8 throughput on the 125M shapes")
    p.add_argument("--out", default=str(RESULTS / "runtime.json"),
                   help="results JSON; the .md and .png are written beside it")
    p.add_argument("--merge", action="store_true", help="keep the rows of models this run does not measure")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        p.error("--repeats and --prompt-len must be at least 1 and --new-tokens at least 2 (a decode speed needs two steps)")
    unknown = {s for s in args.systems.split(",") + args.big_systems.split(",") if s not in SYSTEMS}
    unknown |= {m for m in args.models.split(",") if m not in MODELS}
    if unknown:
        p.error(f"unknown {', '.join(sorted(unknown))}: systems are {', '.join(SYSTEMS)}; models {', '.join(MODELS)}")
    RESULTS.mkdir(exist_ok=True)
    import psutil

    from edgelm.export.pipeline import versions

    bandwidth = measure_bandwidth()
    print(f"memory bandwidth: {bandwidth:.1f} GB/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
            "machine": {**machine(), "ram_gb": psutil.virtual_memory().total / 1e9},
            "versions": versions(), "bandwidth_gbps": bandwidth, "bandwidth_samples_gbps": [bandwidth], "rows": []}
    measured = set(args.models.split(","))
    if args.merge and Path(args.out).is_file():  # keep the rows of models this run does not measure
        old = json.loads(Path(args.out).read_text())
        data["rows"] = [dict(r, earlier_run=r.get("earlier_run") or old.get("date"))
                        for r in old["rows"] if r["model"] not in measured]
        data["earlier_runs"] = old.get("earlier_runs", []) + [
            {k: old[k] for k in ("date", "command", "bandwidth_gbps") if k in old}]

    def save():
        set_ceilings(data)
        out.write_text(json.dumps(data, indent=2) + "\n")
        write_report(data, out)

    for name in args.models.split(","):
        small = name in SMALL
        systems = args.systems.split(",") if small else args.big_systems.split(",")
        batches = [1, 8] if small and args.batch8 else [1]
        print(f"{name}: {systems}, batches {batches}", flush=True)
        bench_model(name, systems, batches, args.repeats, args.prompt_len, args.new_tokens, data["rows"], save)
        data["bandwidth_samples_gbps"].append(measure_bandwidth())
        print(f"memory bandwidth after {name}: {data['bandwidth_samples_gbps'][-1]:.1f} GB/s", flush=True)
    save()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
