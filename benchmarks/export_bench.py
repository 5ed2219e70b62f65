"""Export benchmark: time, peak memory, artifact size and fused operators of `edgelm export`, per model and backend.

    .venv/bin/python benchmarks/export_bench.py [--models gpt2,gpt-neo-125M,...] [--backends builder,optimum]

For each real configuration (benchmarks/configs.py) a Hugging Face folder with random weights is written
once into benchmarks/.cache/<name>/ (streamed, see random_checkpoint.py). Each export runs as its own
subprocess, one at a time: `edgelm export <folder> -o <tmp> --force --json`. Peak RSS is the kernel's
high-water mark of that process (ru_maxrss from wait4), cross-checked by polling the RSS of the whole
process tree every 0.2 s; the larger of the two is reported. Artifacts are deleted after measuring.
Results are rewritten after every row (export.json, export.md, export.png under benchmarks/results/).

Optimum needs about 2.15x the fp32 weight bytes; it is skipped, with the reason recorded, when 2.3x the
weights exceed 80% of this machine's RAM. When `edgelm export --backend optimum` does not work, optimum-cli
is run directly (`optimum-cli export onnx --task text-generation-with-past`) and labelled so.

--merge keeps the rows of an earlier export.json that this run does not re-measure; --render only redraws
export.md and export.png (including the per-phase tables of any export_phases-*.json saved next to them by
benchmarks/export_phases.py, which shows where the builder's peak memory comes from).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import configs  # noqa: E402
import random_checkpoint as RC  # noqa: E402

ROOT = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "SkipLayerNormalization", "FastGelu",
             "Softmax")
RSS_TARGET = 1.3  # builder peak RSS / fp32 weight bytes
ARTIFACT_TARGET = 1.05  # builder fp32 gpt2 artifact / parameter bytes
OPTIMUM_FACTOR = 2.15  # measured: Optimum's peak RSS / fp32 weight bytes (docs/FIELD_NOTES)
OPTIMUM_SKIP_FACTOR = 2.3  # skip when this x weights > RAM_FRACTION x total RAM
RAM_FRACTION = 0.8
POLL_S = 0.2
SUBPROCESS_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# -- measuring one subprocess --------------------------------------------------------------------
def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_measured(cmd: list[str], log_prefix: Path, timeout_s: float) -> dict:
    """Run ``cmd``; return wall time, exit code, peak RSS (kernel high-water mark and polled tree sum)."""
    env = {**os.environ, **SUBPROCESS_ENV}
    out_path, err_path = log_prefix.with_suffix(".stdout"), log_prefix.with_suffix(".stderr")
    with open(out_path, "wb") as so, open(err_path, "wb") as se:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=ROOT)
        root = psutil.Process(proc.pid)
        tree_peak, at_peak, timed_out = 0, {}, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            pids = [proc.pid]
            try:
                pids += [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                pass
            stats = [_proc_status(p) for p in pids]
            total = sum(s.get("VmRSS", 0) for s in stats)
            if total > tree_peak:
                tree_peak = total
                at_peak = {k: sum(s.get(k, 0) for s in stats) for k in ("RssAnon", "RssFile", "RssShmem")}
                at_peak["processes"] = len(pids)
                at_peak["seconds"] = round(time.perf_counter() - started, 1)
            if time.perf_counter() - started > timeout_s and not timed_out:
                timed_out = True
                for p in reversed(pids):
                    try:
                        os.kill(p, 9)
                    except OSError:
                        pass
            time.sleep(POLL_S)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keep Popen from waiting again
    hwm = usage.ru_maxrss * 1024  # Linux: KiB; the child's (and its reaped descendants') peak
    return {
        "returncode": proc.returncode, "timed_out": timed_out, "wall_s": round(wall, 2),
        "peak_rss_bytes": max(hwm, tree_peak), "peak_rss_hwm_bytes": hwm, "peak_rss_polled_tree_bytes": tree_peak,
        "rss_at_polled_peak": at_peak,
        "stdout": out_path.read_text(errors="replace"), "stderr": err_path.read_text(errors="replace"),
    }


def dir_bytes(folder: Path) -> tuple[int, dict[str, int]]:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return sum(files.values()), files


def count_ops_subprocess(onnx_path: Path) -> dict[str, int]:
    """Operator counts of a graph file, read in a child process (protobuf only, not external data)."""
    code = ("import json,sys,onnx,collections;"
            "m=onnx.load(sys.argv[1],load_external_data=False);"
            "print(json.dumps(collections.Counter(n.op_type for n in m.graph.node)))")
    out = subprocess.run([sys.executable, "-c", code, str(onnx_path)], capture_output=True, text=True, check=True)
    return dict(sorted(json.loads(out.stdout).items()))


def _tail(text: str, lines: int = 6) -> str:
    keep = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(keep[-lines:])


def _parse_manifest(stdout: str) -> dict | None:
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        return json.loads(stdout[start:])
    except json.JSONDecodeError:
        return None


# -- one row -------------------------------------------------------------------------------------
def export_edgelm(folder: Path, backend: str, work: Path, timeout_s: float) -> dict:
    out = work / "artifact"
    cmd = [str(BIN / "edgelm"), "export", str(folder), "-o", str(out), "--force", "--json"]
    if backend != "builder":
        cmd += ["--backend", backend]
    m = run_measured(cmd, work / "log", timeout_s)
    row = {"command": shlex.join(_display(cmd))}
    manifest = _parse_manifest(m["stdout"]) if m["returncode"] == 0 else None
    if manifest is None:
        row.update(status="failed", error=_tail(m["stderr"]) or f"exit code {m['returncode']}")
    else:
        v = manifest["validation"]
        ops = manifest["graph"].get("operators", {})
        diffs = v.get("max_abs_diff") or {}
        worst = max(diffs.items(), key=lambda kv: kv[1]) if diffs else (None, None)
        row.update(
            status="ok",
            operators=ops,
            validation={"status": v["status"], "atol": v.get("atol"), "max_abs_diff": worst[1],
                        "worst_output": worst[0], "outputs_compared": len(diffs), "reason": v.get("reason"),
                        "schedule": v.get("schedule")},
            manifest_peak_rss_bytes=manifest["steps"][-1].get("peak_rss_bytes"),
            manifest_seconds=manifest["steps"][-1].get("seconds"),
            build_seconds=manifest["steps"][-1].get("build_seconds"),
            external_data=manifest["graph"].get("external_data"),
        )
        row["artifact_bytes"], row["artifact_files"] = dir_bytes(out)
    row.update({k: m[k] for k in ("returncode", "timed_out", "wall_s", "peak_rss_bytes", "peak_rss_hwm_bytes",
                                  "peak_rss_polled_tree_bytes", "rss_at_polled_peak")})
    return row


_ATOL_RE = re.compile(r"all values close \(atol: ([0-9.eE+-]+)\)")
_FAIL_RE = re.compile(r"max diff(?: =|:) ([0-9.eE+-]+)")


def export_optimum_cli(folder: Path, work: Path, timeout_s: float) -> dict:
    out = work / "artifact"
    cmd = [str(BIN / "optimum-cli"), "export", "onnx", "--model", str(folder), "--task", "text-generation-with-past",
           str(out)]
    m = run_measured(cmd, work / "log", timeout_s)
    row = {"command": shlex.join(_display(cmd))}
    graph = out / "model.onnx"
    if m["returncode"] != 0 or not graph.is_file():
        row.update(status="failed", error=_tail(m["stderr"]) or f"exit code {m['returncode']}")
    else:
        log = m["stdout"] + m["stderr"]
        fails = [float(x) for x in _FAIL_RE.findall(log)]
        atols = _ATOL_RE.findall(log)
        if fails:
            validation = {"status": "failed", "max_abs_diff": max(fails)}
        elif atols:
            validation = {"status": "passed", "max_abs_diff": None, "atol": float(atols[0]),
                          "note": "optimum's own check (prints the difference only when it fails)"}
        elif "succeeded with the warning" in log or "error occurred during validation" in log:
            validation = {"status": "failed", "max_abs_diff": None, "note": _tail(log, 3)}
        else:
            validation = {"status": "passed (no warning)", "max_abs_diff": None,
                          "note": "optimum's own check logs at INFO (not shown by optimum-cli) and warns only when "
                                  "outputs differ beyond its atol; no such warning was logged"}
        row.update(status="ok", operators=count_ops_subprocess(graph), validation=validation)
        row["artifact_bytes"], row["artifact_files"] = dir_bytes(out)
        row["external_data"] = [f for f in row["artifact_files"] if not f.endswith((".onnx", ".json", ".txt"))]
    row.update({k: m[k] for k in ("returncode", "timed_out", "wall_s", "peak_rss_bytes", "peak_rss_hwm_bytes",
                                  "peak_rss_polled_tree_bytes", "rss_at_polled_peak")})
    return row


def _display(cmd: list[str]) -> list[str]:
    """Paths relative to the repository, so the recorded commands read the same on every clone."""
    shown = []
    for part in cmd:
        try:
            p = Path(part)
            shown.append(str(p.relative_to(ROOT)) if p.is_absolute() else part)
        except ValueError:
            shown.append(part)
    return shown


def optimum_skip_reason(weight_bytes: int, ram: int) -> str | None:
    need = OPTIMUM_SKIP_FACTOR * weight_bytes
    if need > RAM_FRACTION * ram:
        return (f"Optimum needs about {OPTIMUM_FACTOR}x the fp32 weights; {OPTIMUM_SKIP_FACTOR} x "
                f"{weight_bytes / 1e9:.2f} GB = {need / 1e9:.1f} GB > {RAM_FRACTION:.0%} of {ram / 1e9:.1f} GB RAM")
    return None


def _projections(ops: dict) -> str:
    """The operators that carry the weights: the default fp32 export's 1x1 Conv (the LM head stays a
    MatMul), MatMul (--linear-layout matmul, fp16), Gemm (Optimum), PackedLinear (packed)."""
    return ", ".join(f"{ops[k]} {k}" for k in ("Conv", "MatMul", "Gemm", "PackedLinear") if ops.get(k)) or "—"


def judge(row: dict) -> dict:
    """PASS/FAIL of the issue's targets (builder rows only)."""
    t = {}
    if row["backend"] != "builder" or row["status"] == "skipped":
        return t
    if row.get("peak_rss_bytes"):  # measured even when the export failed (e.g. at validation)
        t["rss_le_1.3x"] = "PASS" if row["peak_rss_bytes"] <= RSS_TARGET * row["weight_bytes"] else "FAIL"
    if row["status"] != "ok":
        t["export_completed"] = "FAIL"
        return t
    ops = row["operators"]
    one_gqa = ops.get("GroupQueryAttention", 0) == row["num_layers"]
    t["one_gqa_per_layer_no_softmax"] = "PASS" if one_gqa and ops.get("Softmax", 0) == 0 else "FAIL"
    if row["model"] == "gpt2":
        t["artifact_le_1.05x"] = "PASS" if row["artifact_bytes"] <= ARTIFACT_TARGET * row["weight_bytes"] else "FAIL"
    t["validation"] = "PASS" if row["validation"]["status"] == "passed" else "FAIL"
    return t


# -- report --------------------------------------------------------------------------------------
def machine_info() -> dict:
    from common import commit, machine, versions

    m, head = machine(), commit()
    return {"nproc": m["cpus"], "cpu": m["cpu"], "ram_bytes": psutil.virtual_memory().total,
            "platform": m["platform"], "versions": versions(), "git_commit": head.removesuffix("+modified"),
            "edgelm_tree_modified": head.endswith("+modified")}


def edgelm_state() -> dict:
    """Which edgelm source a row measured: HEAD plus a digest of uncommitted changes under edgelm/ (other
    engineers may be editing it while the benchmark runs; the package is installed in editable mode)."""
    import hashlib

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or None
    diff = git("diff", "HEAD", "--", "edgelm")
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "edgelm").split()
    digest = hashlib.sha256(diff.encode())
    for name in untracked:
        digest.update(name.encode() + (ROOT / name).read_bytes())
    changed = git("diff", "HEAD", "--name-only", "--", "edgelm").split() + untracked
    return {"commit": head, "uncommitted_files": changed, "uncommitted_digest": digest.hexdigest()[:12] if changed else None}


EXPORT_PATHS = ("edgelm/export/", "edgelm/_fs.py", "edgelm/manifest.py", "edgelm/errors.py", "edgelm/cli.py")


def describe_source(src: dict) -> str:
    """One line: the commit, and uncommitted changes on the export path (others only counted)."""
    files = src.get("uncommitted_files") or []
    export = [f for f in files if f.startswith(EXPORT_PATHS)]
    other = len(files) - len(export)
    text = f"commit {src.get('commit')}"
    text += (f", uncommitted changes on the export path: {', '.join(export)}" if export
             else ", no uncommitted change under edgelm/export/")
    if other:
        text += f" ({other} other uncommitted file(s) elsewhere in edgelm/)"
    return text


def _gb(x) -> str:
    return "—" if x is None else f"{x / 1e9:.2f}"


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def write_markdown(data: dict, path: Path) -> None:
    m = data["machine"]
    v = m["versions"]
    vs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [
        "# Export benchmark",
        "",
        f"- Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_bytes'] / 2**30:.1f} GiB RAM, no GPU; {m['platform']}",
        f"- Versions: {vs}",
        f"- edgelm commit: {m['git_commit']}" + (" (edgelm/ had uncommitted changes)" if m["edgelm_tree_modified"] else ""),
        f"- Date: {data['finished'] or data['started']} (started {data['started']})",
        "- Command: " + "; ".join(f"`{c}`" for c in data["commands"]),
        "- Weights: random, normal(0, 0.02), real hub configurations (benchmarks/configs.py); fp32.",
        "- Peak RSS: kernel high-water mark of the export process (wait4 ru_maxrss), cross-checked by polling the "
        "RSS of its process tree every 0.2 s; the larger is shown. It includes file-backed pages (e.g. weights "
        "ONNX Runtime maps from disk). Artifact: sum of file sizes in the output folder (tokenizer and manifest "
        "included). Ratios are to the fp32 weight bytes (parameters x 4, tied embedding once).",
        "- The machine is shared: wall times include contention from other jobs (the 1-minute load average at "
        "the start of each export is in export.json); memory figures are per process and unaffected.",
        "",
        "| model | backend | params | fp32 weights GB | wall s | peak RSS GB | RSS / weights | artifact GB | "
        "artifact / weights | projections | GQA | MHA | Attention | SkipLN | FastGelu | Softmax | validation (largest "
        "max abs diff) | targets |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- | --- |",
    ]
    for r in data["rows"]:
        head = f"| {r['model']} | {r['label']} | {r['params'] / 1e6:.0f}M | {_gb(r['weight_bytes'])} |"
        if r["status"] != "ok":
            why = r.get("reason") or r.get("error", "").replace("\n", " ")[-300:]
            targets = ", ".join(f"{k} {v}" for k, v in r["targets"].items()) or "—"
            wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "—"
            lines.append(head + f" {wall} | {_gb(r.get('peak_rss_bytes'))} | "
                         f"{_ratio(r.get('peak_rss_ratio'))} | — | — | — | — | — | — | — | — | — | {r['status']}: {why} | "
                         + targets + " |")
            continue
        ops = r["operators"]
        val = r["validation"]
        diff = val.get("max_abs_diff")
        vtxt = val["status"] + (f" ({diff:.3g}, {val.get('worst_output')})" if diff is not None and
                                val.get("worst_output") else f" ({diff:.3g})" if diff is not None else "")
        if val.get("atol") is not None:
            vtxt += f", atol {val['atol']:g}"
        targets = ", ".join(f"{k} {v}" for k, v in r["targets"].items()) or "— (reference)"
        lines.append(head + f" {r['wall_s']:.0f} | {_gb(r['peak_rss_bytes'])} | {_ratio(r['peak_rss_ratio'])} | "
                     f"{_gb(r['artifact_bytes'])} | {_ratio(r['artifact_ratio'])} | {_projections(ops)} | "
                     + " | ".join(str(ops.get(k, 0)) for k in FUSED_OPS) + f" | {vtxt} | {targets} |")
    lines += ["", "## Targets (from the issue)", ""]
    lines += [f"- {t}" for t in target_summary(data["rows"])]
    notes = [f"- {r['model']} / {r['label']}: {r['note']}" for r in data["rows"] if r.get("note")]
    states = {}
    for r in data["rows"]:
        src = r.get("edgelm_source")
        if src:
            states.setdefault(describe_source(src), []).append(f"{r['model']}/{r['backend']}")
    for text, which in states.items():
        notes.append(f"- edgelm source for {', '.join(which)}: {text}")
    if notes:
        lines += ["", "## Notes", ""] + notes
    lines += phase_sections(path.parent)
    lines += ["", "Chart: export.png (peak RSS / weights and artifact / weights per model and backend). "
              "Raw numbers: export.json.", ""]
    path.write_text("\n".join(lines))


def phase_sections(results: Path) -> list[str]:
    """Tables from benchmarks/export_phases.py runs saved as export_phases-<model>*.json next to the results."""
    out = []
    for f in sorted(results.glob("export_phases-*.json")):
        d = json.loads(f.read_text())
        src = d.get("edgelm_source") or {}
        lines = [
            "", f"### {d['model']}: peak RSS per phase ({f.name})", "",
            f"`{d.get('command', '')}` ({d.get('date', '')}); edgelm {describe_source(src)}; {d['verdict']}; "
            f"{d['weight_bytes'] / 1e9:.2f} GB fp32 weights.",
            "Each line is the interval ending at that mark: its peak RSS (VmHWM, reset at every mark), the "
            "anonymous / file-backed split sampled at that peak, and the RSS when the interval ended.",
            "",
            "| interval (ends at) | s | peak GB | peak / weights | anon GB | file GB | RSS after GB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in d["marks"]:
            name = m["interval"].strip()
            if name.startswith("... up to") and m["peak_rss"] < 0.05 * d["weight_bytes"] + 5e8 and m["seconds"] < 1:
                continue  # glue between two functions, nothing happened there
            lines.append(f"| {name.replace('|', '/')} | {m['seconds']:.1f} | {m['peak_rss'] / 1e9:.2f} | "
                         f"{m['peak_ratio']:.2f}x | {(m['peak_anon_sampled'] or 0) / 1e9:.2f} | "
                         f"{(m['peak_file_sampled'] or 0) / 1e9:.2f} | {m['rss_after'] / 1e9:.2f} |")
        top = max(d["marks"], key=lambda m: m["peak_rss"])
        lines += ["", f"Peak of the run: {top['peak_rss'] / 1e9:.2f} GB ({top['peak_ratio']:.2f}x the weights) in "
                  f"\"{top['interval'].strip()}\": {(top['peak_file_sampled'] or 0) / 1e9:.2f} GB file-backed, "
                  f"{(top['peak_anon_sampled'] or 0) / 1e9:.2f} GB anonymous at the sampled peak."]
        held = d.get("held_outputs_bytes") or {}
        if held:
            lines += ["", "Validation outputs held for the comparison: "
                      + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in held.items()) + "."]
        out += lines
    if out:
        out = ["", "## Where the builder's peak memory comes from (benchmarks/export_phases.py)"] + out
    return out


def target_summary(rows: list[dict]) -> list[str]:
    out = []
    builder = [r for r in rows if r["backend"] == "builder"]
    for r in builder:
        if r["status"] != "ok":
            out.append(f"**FAIL** {r['model']} builder: the export did not complete ({r['status']}: "
                       f"{r.get('error', '').splitlines()[-1][:200] if r.get('error') else '?'})")
        for key, verdict in r["targets"].items():
            if key == "export_completed":
                continue
            if key == "rss_le_1.3x":
                detail = (f"peak RSS {_gb(r['peak_rss_bytes'])} GB = {r['peak_rss_ratio']:.2f}x the fp32 weights "
                          f"(target <= {RSS_TARGET}x)")
            elif key == "artifact_le_1.05x":
                detail = (f"artifact {r['artifact_bytes'] / 1e6:.1f} MB = {r['artifact_ratio']:.3f}x the parameter "
                          f"bytes (target <= {ARTIFACT_TARGET}x)")
            elif key == "one_gqa_per_layer_no_softmax":
                detail = (f"GroupQueryAttention {r['operators'].get('GroupQueryAttention', 0)} for {r['num_layers']} "
                          f"layers, Softmax {r['operators'].get('Softmax', 0)}")
            else:
                detail = f"validation {r['validation']['status']} against PyTorch"
            out.append(f"**{verdict}** {r['model']} builder: {detail}")
    return out


def write_chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows if r["backend"] == "builder"))
    labels += list(dict.fromkeys(r["label"] for r in rows if r["backend"] != "builder" and r["status"] != "skipped"))
    if any(r["status"] == "skipped" for r in rows) and not [x for x in labels if x != "builder"]:
        labels.append("optimum")
    colors = {"builder": "#1f77b4"}
    palette = ["#ff7f0e", "#2ca02c", "#9467bd"]
    for lab in labels:
        if lab not in colors:
            colors[lab] = palette[(len(colors) - 1) % len(palette)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / max(1, len(labels))
    for ax, key, title in ((axes[0], "peak_rss_ratio", "peak RSS / fp32 weight bytes"),
                           (axes[1], "artifact_ratio", "artifact size / fp32 weight bytes")):
        for j, lab in enumerate(labels):
            xs, ys = [], []
            for i, model in enumerate(models):
                x = i + (j - (len(labels) - 1) / 2) * width
                match = [r for r in rows if r["model"] == model and (r["label"] == lab or
                         (r["status"] == "skipped" and r["backend"] != "builder" and lab != "builder"))]
                if not match:
                    continue
                r = match[0]
                val = r.get(key)
                if r["status"] == "skipped" or val is None:
                    text = {"skipped": f"{r['backend']}: skipped (RAM)" if "RAM" in r.get("reason", "") else
                            f"{r['backend']}: skipped", "failed": f"{r['backend']}: failed"}.get(r["status"], "n/a")
                    ax.text(x, 0.05, text, rotation=90, ha="center", va="bottom", fontsize=8, color="dimgray")
                    continue
                xs.append(x)
                ys.append(val)
                ax.text(x, val, f"{val:.2f}", ha="center", va="bottom", fontsize=7)
            ax.bar(xs, ys, width, label=lab, color=colors[lab])
        if key == "peak_rss_ratio":
            ax.axhline(RSS_TARGET, color="red", linestyle="--", linewidth=1, label=f"target {RSS_TARGET}x (builder)")
        else:
            ax.axhline(ARTIFACT_TARGET, color="red", linestyle=":", linewidth=1,
                       label=f"{ARTIFACT_TARGET}x (builder gpt2 target)")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=15)
        ax.set_title(title)
        ax.set_ylabel("ratio")
        ax.legend(fontsize=8)
    m = data["machine"]
    fig.suptitle(f"edgelm export, fp32, random weights — {m['nproc']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM "
                 f"({(data['finished'] or data['started'])[:10]})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(data: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / "export.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.rename(results / "export.json")
    write_markdown(data, results / "export.md")
    write_chart(data, results / "export.png")


# -- main ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(configs.MODELS),
                    help=f"comma-separated, from: {', '.join(configs.MODELS)} (default: all, smallest first)")
    ap.add_argument("--backends", default="builder,optimum", help="comma-separated: builder, optimum")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for export.json/.md/.png")
    ap.add_argument("--merge", action="store_true",
                    help="keep rows of export.json for model/backend pairs this run does not measure")
    ap.add_argument("--timeout", type=float, default=5400, help="seconds per export before it is killed")
    ap.add_argument("--skip-check", action="store_true", help="skip the check of weight names against transformers")
    ap.add_argument("--render", action="store_true", help="only rewrite export.md and export.png from export.json")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads((args.results / "export.json").read_text())
        for r in data["rows"]:
            r["targets"] = judge(r)
        save(data, args.results)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [m for m in models if m not in configs.MODELS] + [b for b in backends if b not in ("builder", "optimum")]
    if unknown:
        ap.error(f"unknown model or backend: {', '.join(unknown)}")
    command = shlex.join([".venv/bin/python", "benchmarks/export_bench.py"] + (argv if argv is not None else sys.argv[1:]))

    CACHE.mkdir(parents=True, exist_ok=True)
    started_clock = time.perf_counter()
    data = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "finished": None,
            "commands": [command], "machine": machine_info(), "rows": []}
    old = {}
    if args.merge and (args.results / "export.json").is_file():
        prev = json.loads((args.results / "export.json").read_text())
        old = {(r["model"], r["backend"]): r for r in prev["rows"]}
        data["commands"] = list(dict.fromkeys(prev.get("commands", []) + [command]))
        data["started"] = prev.get("started", data["started"])
    if not args.skip_check:
        for line in RC.check_against_transformers(CACHE / "_check"):
            tqdm.write(line)
    ram = data["machine"]["ram_bytes"]

    jobs = [(m, b) for m in models for b in backends]
    order = list(configs.MODELS)
    keep = [r for key, r in old.items() if key not in set(jobs)]

    def ordered(rows):
        return sorted(rows, key=lambda r: (order.index(r["model"]), r["backend"] != "builder"))

    done: list[dict] = []
    bar = tqdm(jobs, desc="export bench", unit="export")
    for model, backend in bar:
        hub, cfg = configs.MODELS[model]
        folder = CACHE / model
        bar.set_postfix_str(f"{model}: preparing weights")
        if RC.ensure_model_folder(cfg, folder, progress=tqdm):
            tqdm.write(f"{model}: wrote random-weight folder {folder.relative_to(ROOT)}")
        params = RC.param_count(cfg)
        row = {"model": model, "hub_config": hub, "backend": backend, "label": backend, "params": params,
               "weight_bytes": params * 4, "num_layers": cfg.get("n_layer") or cfg["num_layers"],
               "edgelm_source": edgelm_state()}
        skip = optimum_skip_reason(row["weight_bytes"], ram) if backend == "optimum" else None
        free = shutil.disk_usage(CACHE).free
        if not skip and free < 2.5 * row["weight_bytes"]:
            skip = f"{free / 1e9:.1f} GB free disk < 2.5x the weights"
        if skip:
            row.update(status="skipped", reason=skip)
            tqdm.write(f"{model} / {backend}: {skip}")
        else:
            bar.set_postfix_str(f"{model}: {backend} export running")
            row["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)
            work = Path(tempfile.mkdtemp(prefix=f"run-{model}-{backend}-", dir=CACHE))
            try:
                if backend == "builder":
                    row.update(export_edgelm(folder, "builder", work, args.timeout))
                else:
                    result = export_edgelm(folder, "optimum", work, args.timeout)
                    if result["status"] == "ok":
                        row.update(result, label="optimum (edgelm)")
                    else:
                        first_error = result["error"]
                        shutil.rmtree(work / "artifact", ignore_errors=True)
                        row["label"] = "optimum-cli (direct)"
                        row.update(export_optimum_cli(folder, work, args.timeout))
                        row["note"] = ("`edgelm export --backend optimum` did not work here ("
                                       + first_error.splitlines()[-1][:200] + "); optimum-cli was run directly")
            finally:
                shutil.rmtree(work, ignore_errors=True)  # the artifact too: disk
            row["peak_rss_ratio"] = row["peak_rss_bytes"] / row["weight_bytes"]
            if row["status"] == "ok":
                row["artifact_ratio"] = row["artifact_bytes"] / row["weight_bytes"]
            elif row.get("returncode") in (-9, 137):
                row["error"] = (row.get("error", "") + " (killed by signal 9: out of memory or timeout)").strip()
        row["targets"] = judge(row)
        done.append(row)
        data["rows"] = ordered(keep + done)
        data["elapsed_s"] = round(time.perf_counter() - started_clock, 1)
        data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        save(data, args.results)
        if row["status"] == "ok":
            tqdm.write(f"{model} / {row['label']}: {row['wall_s']:.0f} s, peak RSS {_gb(row['peak_rss_bytes'])} GB "
                       f"({row['peak_rss_ratio']:.2f}x), artifact {_gb(row['artifact_bytes'])} GB "
                       f"({row['artifact_ratio']:.2f}x), validation {row['validation']['status']}, "
                       f"targets {row['targets'] or '-'}")
        elif row["status"] != "skipped":
            tqdm.write(f"{model} / {row['label']}: {row['status']}: {row.get('error')}")
    bar.close()
    print(f"results: {args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results} "
          f"({time.perf_counter() - started_clock:.0f} s)")
    for line in target_summary(data["rows"]):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
