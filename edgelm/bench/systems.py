"""The systems a benchmark compares: edgelm itself and its peers, as data.

A peer runs from the artifact's source checkpoint (``manifest.model.source``; an embedded model
resolves to edgelm/assets/models/...), in its own format, made once and cached: Optimum's ONNX
export, CTranslate2's converted model. A peer that is not installed, does not support the
architecture, or has no source model is skipped, with a note that says why and what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "worker.py"


@dataclass(frozen=True)
class System:
    name: str
    label: str
    modules: tuple[str, ...]  # what must import in its Python
    install: str  # how to get it
    model_types: tuple[str, ...] | None = None  # None: every architecture edgelm exports
    unsupported: str = ""
    prepared: bool = False  # needs its own model format, made from the source checkpoint
    memory_factor: float = 1.0  # rough resident memory / fp32 weight bytes, to decide interleaving


SYSTEMS = {
    "edgelm": System("edgelm", "edgelm (ONNX Runtime loop)", ("onnxruntime", "tokenizers"), "pip install 'edgelm[cpu]'"),
    "pytorch": System("pytorch", "PyTorch generate", ("torch", "transformers"), "pip install 'edgelm[export]'",
                      memory_factor=1.5),
    "optimum": System("optimum", "Optimum ORTModelForCausalLM", ("optimum.onnxruntime", "optimum.exporters.onnx"),
                      "pip install 'edgelm[optimum]'", prepared=True, memory_factor=2.5),
    "ctranslate2": System("ctranslate2", "CTranslate2 Generator", ("ctranslate2", "transformers"),
                          "pip install 'edgelm[bench]' (ctranslate2)", model_types=("gpt2",),
                          unsupported="CTranslate2 4.8 has no GPT-Neo loader", prepared=True, memory_factor=1.2),
}
PEERS = tuple(n for n in SYSTEMS if n != "edgelm")


def missing_modules(system: System, python: str | None = None) -> list[str]:
    """The modules of ``system`` that do not import (checked in ``python`` when it is another interpreter)."""
    if not python or os.path.realpath(python) == os.path.realpath(sys.executable):
        return [m for m in system.modules if not _find_spec(m)]
    code = ("import importlib.util, json, sys; mods = json.loads(sys.argv[1]); "
            "print(json.dumps([m for m in mods if importlib.util.find_spec(m.split('.')[0]) is None "
            "or (('.' in m) and importlib.util.find_spec(m) is None)]))")
    try:
        out = subprocess.run([python, "-c", code, json.dumps(list(system.modules))], capture_output=True,
                             text=True, timeout=60, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return [f"(cannot run {python})"]


def _find_spec(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing
        return False


def source_folder(manifest: dict) -> tuple[Path | None, str]:
    """The artifact's source checkpoint as a local folder, or None and the reason."""
    from ..export.embedded import EMBEDDED_MODELS, PREFIX

    source = str(manifest["model"]["source"])
    if source.startswith(PREFIX) and source[len(PREFIX):] in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[source[len(PREFIX):]], ""
    path = Path(source)
    if (path / "config.json").is_file():
        return path, ""
    parts = path.parts
    if "assets" in parts and "models" in parts and path.name in EMBEDDED_MODELS:  # an embedded model, moved clone
        return EMBEDDED_MODELS[path.name], ""
    if not path.is_absolute() and source.count("/") <= 1:  # a hub id: only the local cache, never the network
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, local_files_only=True)), ""
        except Exception:  # noqa: BLE001 - any failure means: not available offline
            pass
    return None, (f"the artifact's source model '{source}' is neither a local folder nor in the Hugging Face "
                  "cache, and peers run from it; export from a local folder, or download the model first")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("EDGELM_CACHE"):
        return Path(os.environ["EDGELM_CACHE"]) / "bench"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgelm" / "bench"


def source_key(source: Path) -> str:
    """A key that changes when the source checkpoint's files change (path, names, sizes, times)."""
    source = source.resolve()
    items = [str(source)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                             for p in sorted(source.iterdir()) if p.is_file()]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def staged_source(source: Path, artifact: Path, root: Path) -> Path:
    """The source folder plus the artifact's tokenizer files, as links (converters need the tokenizer)."""
    staged = root / source_key(source) / "source"
    if staged.is_dir():
        return staged
    tmp = staged.parent / f".source.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {p.name: p for p in source.resolve().iterdir() if p.is_file()}
    for p in artifact.iterdir():  # the artifact keeps a copy of the tokenizer files
        if p.is_file() and p.name not in files and ("token" in p.name or p.name in ("vocab.json", "merges.txt")):
            files[p.name] = p
    for name, p in files.items():
        try:
            (tmp / name).symlink_to(p.resolve())
        except OSError:
            shutil.copyfile(p, tmp / name)
    tmp.rename(staged)
    return staged


def prepared_model(system: System, staged: Path, provider: str, python: str, env: dict) -> Path:
    """The peer's own model format, made once per source checkpoint (in a subprocess) and cached."""
    out = staged.parent / f"{system.name}-{provider}"
    if (out / ".complete").is_file():
        return out
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    spec = {"system": system.name, "source": str(staged), "out": str(tmp), "provider": provider}
    log = staged.parent / f"{system.name}-prepare.log"
    with open(log, "w") as f:
        proc = subprocess.run([python, str(WORKER), "prepare", json.dumps(spec)], stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"preparing its model failed: {log_tail(log)} (full log: {log})")
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = [x.strip() for x in Path(path).read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    return " / ".join(text[-lines:])[:600] or "no output"


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of the files in ``folder`` (links followed, hidden markers skipped)."""
    total = 0
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            total += p.stat().st_size
    return total
