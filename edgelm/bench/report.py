"""The benchmark report: ``report.json`` (the records), ``report.md`` (the tables), three PNG charts.

    report.json   {format "edgelm-bench", schema_version, created, command, machine, versions,
                   settings, bandwidth_gbps, energy_method, energy_tool, notes,
                   records: [one per artifact x system x batch size, see RECORD_KEYS]}
    report.md     speed, memory and size, energy (method next to every figure), skipped peers
    decode_speed.png, energy_per_token.png, size.png

Written into a hidden folder renamed to REPORT_DIR at the end (edgelm._fs.atomic_output_dir).
"""

from __future__ import annotations

import json
from pathlib import Path

from .._fs import atomic_output_dir

# Keys every record has; a measured one ("status": "ok") has MEASURED_KEYS too.
RECORD_KEYS = ("artifact", "model", "model_type", "source", "system", "label", "status", "note", "batch",
               "prompt_tokens", "new_tokens", "repeats", "provider", "dtype", "greedy", "interleaved")
MEASURED_KEYS = ("time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_all",
                 "per_token_latency_p50_s", "per_token_latency_p95_s", "peak_rss_bytes", "size_bytes", "cold_start_s",
                 "load_s", "weight_bytes_per_token", "bandwidth_gbps", "ceiling_tokens_per_s", "fraction_of_ceiling",
                 "energy", "agreement_with_edgelm", "kernels", "lm_head_screen")
FILES = ("report.json", "report.md", "decode_speed.png", "energy_per_token.png", "size.png")


def write_report(report: dict, out: str | Path, force: bool = False) -> Path:
    """Write every report file into ``out`` atomically; returns ``out``."""
    out = Path(out)
    with atomic_output_dir(out, force) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        try:
            charts(report, tmp)
        except ImportError:
            report.setdefault("notes", []).append("matplotlib is not installed: no charts (pip install 'edgelm[bench]')")
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(report))
    return out


# -- Markdown --------------------------------------------------------------------------------------
def short_method(energy: dict) -> str:
    """A table-sized label for how an energy figure was made."""
    if not energy or not energy.get("measured"):
        return "not measured"
    d = energy.get("details") or {}
    cpu = d.get("cpu") or ""
    if cpu.startswith("RAPL"):
        label = "CPU RAPL"
    elif cpu.startswith("estimated from TDP"):
        label = "CPU TDP×load estimate"
    elif cpu.startswith("estimated as a constant"):
        label = "CPU constant TDP share"
    else:
        label = f"CPU {cpu}" if cpu else "CPU untracked"
    if d.get("gpu") and d["gpu"] != "none":
        label += f", GPU {d['gpu'].replace(' measured', '')}"
    if d.get("ram_share") is not None:
        label += f", RAM {d.get('ram_watts', 0):g} W const. ({d['ram_share']:.0%})"
    return label


def _ram_shares(report: dict) -> str:
    shares = [r["energy"]["details"].get("ram_share") for r in _rows(report)
              if r["energy"].get("measured") and (r["energy"].get("details") or {}).get("ram_share") is not None]
    if not shares:
        return ""
    return f"; RAM's constant is {min(shares):.0%} to {max(shares):.0%} of each figure (per system in the table)"


def _fmt(value, spec: str, scale: float = 1.0, empty: str = "n/a") -> str:
    return empty if value is None else format(value * scale, spec)


def _rows(report: dict) -> list[dict]:
    return [r for r in report["records"] if r["status"] == "ok"]


def markdown(report: dict) -> str:
    m, s, v = report["machine"], report["settings"], report["versions"]
    models = ", ".join(dict.fromkeys(r["model"] for r in report["records"]))
    lines = [f"# edgelm bench: {models}", ""]
    gpus = ", ".join(m.get("gpus") or []) or "no GPU"
    cores = f" ({m['physical_cores']} cores)" if m.get("physical_cores") else ""
    load = ""
    if m.get("load_average_at_start"):
        load = f", 1-min load average {m['load_average_at_start'][0]} at start"
        if m.get("load_average_at_end"):
            load += f" and {m['load_average_at_end'][0]} at the end"
    lines += [f"Machine: {m['processor']}, {m['cpus']} logical CPUs{cores}{load}, "
              f"{m['ram_bytes'] / 1e9:.1f} GB RAM, {gpus}; {m['platform']}. Date: {report['created']}.",
              "",
              "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
              ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    lines += [f"Settings: prompt of {s['prompt_len']} tokens (held-out Austen text), {s['new_tokens']} new tokens, "
              f"greedy, end-of-text ignored; batch {', '.join(map(str, s['batches']))}; median of {s['repeats']} repeats "
              f"after one untimed run; provider {s['provider']}; each system in its own process, systems interleaved "
              "within each repeat (order rotated).",
              "",
              f"Memory bandwidth measured in this run: **{report['bandwidth_gbps']:.1f} GB/s**. Ceiling = batch x "
              "bandwidth / weight bytes read per decode step (every weight once, position table excluded); "
              "\"of ceiling\" is decode speed over that ceiling.",
              ""]
    if report.get("energy_method"):
        rec = next(r for r in _rows(report) if r["energy"].get("measured"))
        e = rec["energy"]
        lines += [f"Energy: {report.get('energy_tool')}, offline tracker (no network), each timed run measured on "
                  f"its own; counted: {(e.get('details') or {}).get('scope')}; grid of {e.get('country')} "
                  f"({_fmt(e.get('grid_gco2e_per_kwh'), '.0f')} gCO2e/kWh). Method: **{report['energy_method']}**"
                  f"{_ram_shares(report)}.", ""]
    else:
        lines += ["Energy: **not measured** — " + "; ".join(report.get("notes") or ["no reason recorded"]), ""]

    rows = _rows(report)
    ref = {(r["model"], r["batch"]): r for r in rows if r["system"] == "edgelm"}
    lines += ["## Speed", "",
              "| model | batch | system | decode tok/s | edgelm vs it | of ceiling | TTFT ms | prefill tok/s | "
              "p50 ms/token | p95 ms/token |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = ref.get((r["model"], r["batch"]))
        ratio = f"{base['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}x" if base else "n/a"
        lines.append(f"| {r['model']} | {r['batch']} | {r['system']} | {r['decode_tokens_per_s']:.1f} | {ratio} | "
                     f"{_fmt(r['fraction_of_ceiling'], '.0%')} | {_fmt(r['time_to_first_token_s'], '.1f', 1e3)} | "
                     f"{r['prefill_tokens_per_s']:.0f} | {_fmt(r['per_token_latency_p50_s'], '.2f', 1e3)} | "
                     f"{_fmt(r['per_token_latency_p95_s'], '.2f', 1e3)} |")
    kernels = sorted({f"{r['model']}: {r['kernels']}" for r in rows if r["system"] == "edgelm" and r.get("kernels")})
    if kernels:
        lines += ["", "edgelm ran its artifact on these kernels (the runtime's default, `--kernels auto`): "
                  + "; ".join(kernels) + "."]
    if any(r.get("lm_head_screen") for r in rows if r["system"] == "edgelm"):
        lines += ["", "On edgelm's kernels a greedy step screens the LM head (an int8 copy gives each logit an "
                  "estimate with a proven bound; only the panels that may hold the argmax are computed in fp32, the "
                  "same tokens): it reads fewer bytes than the ceiling counts, so its \"of ceiling\" can pass 100%."]
    lines += ["", "## Memory, size, start-up", "",
              "| model | batch | system | peak RSS MB | size on disk MB | cold start s | imports + load s | dtype |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['system']} | {_fmt(r['peak_rss_bytes'], '.0f', 1e-6)} | "
                     f"{_fmt(r['size_bytes'], '.1f', 1e-6)} | {_fmt(r['cold_start_s'], '.2f')} | "
                     f"{_fmt(r['load_s'], '.2f')} | {r['dtype']} |")
    lines += ["", "Cold start: from starting the process (interpreter, imports) to the model ready; peak RSS of "
              "that process over its whole life (load, warm-up, runs). Size on disk: what each system loads — "
              "edgelm its artifact, PyTorch the source checkpoint (converted to fp32 when loaded), Optimum its "
              "ONNX export, CTranslate2 its converted model.", "",
              "## Energy", "",
              "| model | batch | system | J/token | gCO2e per 1,000 tokens | kWh (all timed runs) | tokens | method |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        e = r["energy"]
        if e.get("measured"):
            lines.append(f"| {r['model']} | {r['batch']} | {r['system']} | {e['joules_per_token']:.3f} | "
                         f"{_fmt(e.get('gco2e_per_1000_tokens'), '.4f')} | {e['kwh']:.3g} | {e['tokens']} | "
                         f"{short_method(e)} |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['system']} | not measured | | | {e.get('tokens', '')} | "
                         f"{e.get('reason')} |")
    skipped = [r for r in report["records"] if r["status"] != "ok"]
    if skipped:
        lines += ["", "## Skipped or failed", ""]
        seen = set()
        for r in skipped:
            key = (r["model"], r["system"], r["note"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['model']} / {r['system']} ({r['status']}): {r['note']}")
    checks = [r for r in rows if r["system"] != "edgelm" and r.get("agreement_with_edgelm")]
    if checks:
        lines += ["", "## Same work", "",
                  "Greedy tokens of the first row, first timed run, identical to edgelm's from the start: "
                  + "; ".join(f"{r['model']} b{r['batch']} {r['system']} {r['agreement_with_edgelm']['leading_tokens_equal']}"
                              f"/{r['agreement_with_edgelm']['of']}" for r in checks) + "."]
    if not all(r.get("interleaved", True) for r in rows):
        lines += ["", "Some settings ran one system at a time (they did not fit in memory together): "
                  "compare those as ratios with care."]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# -- charts ----------------------------------------------------------------------------------------
def charts(report: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(report)
    systems = list(dict.fromkeys(r["system"] for r in rows)) or ["edgelm"]
    keys = list(dict.fromkeys((r["model"], r["batch"]) for r in rows)) or [("none", 1)]
    by = {(r["model"], r["batch"], r["system"]): r for r in rows}
    width = 0.8 / len(systems)
    xs = range(len(keys))

    def grouped(ax, value, label):
        for j, s in enumerate(systems):
            vals = [value(by[(k[0], k[1], s)]) if (k[0], k[1], s) in by else 0 for k in keys]
            bars = ax.bar([i + j * width for i in xs], [v or 0 for v in vals], width, label=s)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([i + 0.4 - width / 2 for i in xs])
        ax.set_xticklabels([f"{m}\nbatch {b}" for m, b in keys], fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)

    # decode speed, with the bandwidth ceiling per group
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(keys)), 4.2))
    grouped(ax, lambda r: r["decode_tokens_per_s"], "decode tokens / s (higher is better)")
    for i, k in enumerate(keys):
        ceil = by.get((k[0], k[1], "edgelm"), {}).get("ceiling_tokens_per_s")
        if ceil:
            ax.plot([i - width / 2, i + 0.8 - width / 2], [ceil, ceil], "k--", lw=1)
            ax.annotate(f"ceiling {ceil:.0f}", (i + 0.4 - width / 2, ceil), ha="center", va="bottom", fontsize=7)
    ax.set_title(f"Decode speed, {report['settings']['provider']}; dashed: memory-bandwidth ceiling "
                 f"({report['bandwidth_gbps']:.1f} GB/s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "decode_speed.png", dpi=120)
    plt.close(fig)

    # energy per token, split by component (RAM is CodeCarbon's constant, not a measurement)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(keys)), 4.4))
    measured = [r for r in rows if r["energy"].get("measured")]
    if measured:
        for j, s in enumerate(systems):
            bottom = [0.0] * len(keys)
            for comp, hatch in (("cpu_j", ""), ("gpu_j", "xx"), ("ram_j", "//")):
                vals = []
                for k in keys:
                    r = by.get((k[0], k[1], s))
                    e = r["energy"] if r else {}
                    vals.append(e["components"].get(comp, 0.0) / e["tokens"] if e.get("measured") else 0.0)
                if not any(vals):
                    continue
                ax.bar([i + j * width for i in xs], vals, width, bottom=bottom, hatch=hatch,
                       color=f"C{j}", edgecolor="white", alpha=1.0 if comp == "cpu_j" else 0.55,
                       label=s if not any(bottom) else None)
                bottom = [a + b for a, b in zip(bottom, vals)]
            for i, total in enumerate(bottom):
                if total:
                    ax.annotate(f"{total:.3f}", (i + j * width, total), ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i + 0.4 - width / 2 for i in xs])
        ax.set_xticklabels([f"{m}\nbatch {b}" for m, b in keys], fontsize=8)
        ax.set_ylabel("joules per generated token (lower is better)")
        ax.legend(fontsize=8, title="solid: CPU, xx: GPU, //: RAM", title_fontsize=7)
        ax.set_title(_wrap(f"Energy per token ({report.get('energy_tool')}, grid {measured[0]['energy']['country']}); "
                           f"{report.get('energy_method')}"), fontsize=7)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, _wrap("Energy was not measured: " + "; ".join(report.get("notes") or ["no reason"])),
                ha="center", va="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "energy_per_token.png", dpi=120)
    plt.close(fig)

    # size on disk and peak resident memory, per model and system (first batch size)
    first = {}
    for r in rows:
        first.setdefault((r["model"], r["system"]), r)
    models = list(dict.fromkeys(r["model"] for r in rows)) or ["none"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.4 * len(models) * 2), 4.2))
    for ax, key, label in ((axes[0], "size_bytes", "size on disk, MB"), (axes[1], "peak_rss_bytes", "peak RSS, MB")):
        for j, s in enumerate(systems):
            vals = [(first.get((m, s)) or {}).get(key) or 0 for m in models]
            bars = ax.bar([i + j * width for i in range(len(models))], [v / 1e6 for v in vals], width, label=s)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))])
        ax.set_xticklabels(models, fontsize=8)
        ax.set_ylabel(f"{label} (lower is better)")
        ax.legend(fontsize=8)
    axes[0].set_title("Artifact / model files on disk", fontsize=9)
    axes[1].set_title(f"Peak resident memory of the process (batch {rows[0]['batch'] if rows else 1})", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "size.png", dpi=120)
    plt.close(fig)


def _wrap(text: str, width: int = 100) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
