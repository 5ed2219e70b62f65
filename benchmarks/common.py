"""What every benchmark records beside its numbers: the machine, the package versions, the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    flags: set[str] = set()
    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags)
    return {"cpu": cpu, "cpus": os.cpu_count(), "ram_gb": round(ram, 1), "isa": isa, "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()[0]}


def versions() -> dict:
    from edgelm.bench.machine import versions as package_versions

    return package_versions()


def write_results(stem: Path, result: dict, markdown, plot) -> str:
    """stem.json, stem.md (``markdown(result)``) and stem.png (``plot(result, path)``); returns the Markdown."""
    import json

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    plot(result, stem.with_suffix(".png"))
    return text


def commit(*paths: str) -> str:
    """HEAD's short hash, marked '+modified' when ``paths`` (default edgelm/) have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *(paths or ("edgelm",))], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+modified" if dirty else "")
