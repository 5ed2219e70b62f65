"""Atomic output folders: work in a hidden sibling folder, rename into place at the end."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, OutputExistsError


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; choose another output folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; the output must be a folder")


@contextmanager
def atomic_output_dir(out: Path, force: bool):
    """Yield a temporary folder that becomes ``out`` only if the block finishes without error."""
    out = Path(out)
    check_output(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder {out.parent} ({exc.strerror}); choose a writable location") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_table(folder: Path) -> dict:
    """{relative name: {bytes, sha256}} for every file in ``folder`` except the manifest itself."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
