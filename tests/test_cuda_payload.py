"""scripts/cuda_payload.py, which packs onnxruntime-gpu for the GPU machine (scripts/cuda_check.sh):
on a synthetic ELF whose .nv_fatbin holds kernels for two GPU generations."""

from __future__ import annotations

import struct
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import cuda_payload  # noqa: E402


def fatbin(entries: list[tuple[int, bytes]]) -> bytes:
    """One fatbin container of cubin entries [(sm, payload)], headers laid out as the real ones are."""
    body = b""
    for sm, payload in entries:
        header = struct.pack("<HHIQ", 2, 0x101, 64, len(payload)) + struct.pack("<IIII", 0, 0, 0, sm) + bytes(32)
        body += header + payload
    return struct.pack("<IHHQ", cuda_payload.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with(sections: dict[str, bytes]) -> bytearray:
    """A 64-bit little-endian ELF holding ``sections`` (and the section-name table), nothing else."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    blobs = [*sections.values(), names]
    data, offsets, pos = b"", [], 64
    for blob in blobs:
        offsets.append(pos + len(data))
        data += blob + bytes(-len(blob) % 8)
    shoff = 64 + len(data)
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0,
                                                              64, len(blobs) + 1, len(blobs))
    table, name_at = bytes(64), 1
    for name, blob, off in zip([*sections, ".shstrtab"], blobs, offsets):
        table += struct.pack("<IIQQQQIIQQ", name_at, 1, 0, 0, off, len(blob), 0, 0, 8, 0)
        name_at += len(name) + 1
    return bytearray(header + data + table)


def test_only_the_kept_generations_kernels_remain(tmp_path):
    sm80, sm90 = b"\x80" * 40, b"\x90" * 24
    elf = elf_with({".text": b"code" * 4, ".nv_fatbin": fatbin([(80, sm80), (90, sm90)])})
    facts = cuda_payload.keep_one_generation(elf, 90)
    assert facts == {"entries": 2, "kept_bytes": 24, "zeroed_bytes": 40}
    assert sm90 in elf and sm80 not in elf and b"code" * 4 in elf
    with pytest.raises(ValueError, match="no kernels for sm_75"):
        cuda_payload.keep_one_generation(elf_with({".nv_fatbin": fatbin([(80, sm80)])}), 75)

    wheel = tmp_path / "onnxruntime_gpu-0-cp312-cp312-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(cuda_payload.CUDA_PROVIDER, bytes(elf_with({".nv_fatbin": fatbin([(80, sm80), (90, sm90)])})))
        zf.writestr("onnxruntime/__init__.py", "__version__ = '0'\n")
        zf.writestr("onnxruntime/capi/libonnxruntime.so.1.31.1", b"C API library, not loaded by Python")
    manifest = cuda_payload.pack(wheel, tmp_path / "parts", sm=90, part_mib=1)
    cuda_payload.unpack(tmp_path / "parts", tmp_path / "site")
    provider = (tmp_path / "site" / cuda_payload.CUDA_PROVIDER).read_bytes()
    assert sm90 in provider and sm80 not in provider and manifest["zeroed_bytes"] == 40
    assert (tmp_path / "site/onnxruntime/__init__.py").is_file()
    assert not list((tmp_path / "site/onnxruntime/capi").glob("libonnxruntime.so*"))

    part = tmp_path / "parts" / manifest["parts"][0]["file"]
    part.write_bytes(part.read_bytes()[:-1] + b"!")  # a transfer that went wrong
    with pytest.raises(SystemExit, match="differs from the packed part: carry it again"):
        cuda_payload.unpack(tmp_path / "parts", tmp_path / "again")
