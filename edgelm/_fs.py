"""Atomic output folders: work in a hidden sibling folder, rename into place at the end."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, OutputExistsError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


def within(inner, outer) -> bool:
    """``inner`` is ``outer`` or lies inside it, as written (made absolute) or once links are followed:
    a model reached through a link is still the folder that replacing ``outer`` would delete."""
    for resolve in (os.path.abspath, os.path.realpath):
        a, b = Path(resolve(inner)), Path(resolve(outer))
        if a == b or b in a.parents:
            return True
    return False


def input_within(folder, inputs):
    """The first of ``inputs`` (paths; None and those that do not exist skipped) that is ``folder`` or
    lies inside it, else None: what deleting ``folder`` would delete."""
    return next((given for given in inputs if given is not None and Path(given).exists() and within(given, folder)),
                None)


def check_output(out: Path, force: bool, inputs=()) -> None:
    """Refuse an output folder that exists (without ``force``), is a file, or whose replacement would
    delete what the command reads (``inputs``: paths; those that do not exist are skipped) or the
    folder it runs in."""
    here = os.getcwd()
    given = input_within(out, [*inputs, here])
    if given is not None:
        what = "the current folder" if given is here else f"the input {given}"
        raise InputError(f"the output folder {out} is or holds {what}, which writing it would replace; "
                         "choose an output folder outside it with -o")
    if os.path.lexists(out) and not force:  # a link to nothing is there too: a rename would fail on it
        raise OutputExistsError(f"{out} exists; choose another output folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; the output must be a folder")
    parent = Path(os.path.abspath(out)).parent
    existing = parent  # the folder the missing ones would be made in
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write in {parent}: {existing} is a file; choose a writable location with -o")
    try:  # a real write: permission bits say nothing to root, nor about /proc or a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".edgelm-write-check-", dir=existing))
    except OSError as exc:
        raise InputError(f"cannot write in {parent} ({exc.strerror or exc} in {existing}); "
                         "choose a writable location with -o") from None


@contextmanager
def atomic_output_dir(out: Path, force: bool, inputs=()):
    """Yield a temporary folder that becomes ``out`` only if the block finishes without error; on any
    error (an interrupt included) the temporary folder is removed and ``out`` is left as it was; a full
    disk or quota is then one sentence naming the output's device."""
    out = Path(os.path.abspath(out))
    check_output(out, force, inputs)
    remove_abandoned(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise InputError(f"cannot write in {out.parent} ({exc.strerror}); choose a writable location with -o") from None
    try:
        yield tmp
        replace_folder(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = no_space(exc, out.parent)
        if full:
            raise full from None
        raise


def remove_abandoned(out: Path) -> None:
    """Remove the temporary folders (``.NAME.tmp-PID``, ``.NAME.old-PID``) of earlier runs for ``out``
    whose process is gone: killed (SIGKILL, the OOM killer) before it could clean up."""
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = folder.name[len(out.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            _remove(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def no_space(exc: BaseException, where=None) -> InputError | None:
    """A full disk or quota (``exc`` an OSError with ENOSPC or EDQUOT) as one sentence, else None.
    ``where``: a folder on that device, when known."""
    if not (isinstance(exc, OSError) and exc.errno in NO_SPACE):
        return None
    device = f"the device holding {where}" if where else "a device this command writes to"
    return InputError(f"no space left on {device}; free space or choose another location with -o")


def os_error(exc: OSError) -> InputError:
    """Any other OSError (a name too long, a folder that cannot be made, a file that cannot be read) as
    one sentence that names the path."""
    what = exc.strerror or str(exc) or type(exc).__name__
    path = f" ({exc.filename})" if exc.filename else ""
    return InputError(f"{what}{path}; check the paths and folders given: each must exist and be readable, "
                      "and an output's folder writable")


def replace_folder(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is set aside first, put back if the rename
    fails, and removed once it succeeded."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if not os.path.lexists(out):
        new.rename(out)
        return
    out.rename(old)  # a link is set aside as a link: what it points to is left alone
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    """Remove a folder, or a link as a link (what it points to is left alone)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 22, on_block=None) -> str:
    """The file's sha256; ``on_block(n)`` after each block of ``n`` bytes (a progress bar's update)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if on_block is not None:
                on_block(len(block))
    return digest.hexdigest()


def file_table(folder: Path) -> dict:
    """{relative name: {bytes, sha256}} for every file in ``folder`` except the manifest itself."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
