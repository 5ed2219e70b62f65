"""ONNX Runtime's GPU build, packed to travel to a device machine that reaches no package registry.

    python scripts/cuda_payload.py pack WHEEL OUT_DIR [--sm 90] [--part-mib 30]   (here)
    python scripts/cuda_payload.py unpack OUT_DIR TARGET                            (there)
    python scripts/cuda_payload.py libpath                                          (there)

The onnxruntime-gpu 1.31.1 wheel is 255 MB; one device call carries 64 MiB. 218 MB of its CUDA
provider library are kernels in the ELF section .nv_fatbin, compiled for six GPU generations
(sm_75, 80, 86, 89, 90, 120). ``pack`` zeroes the kernels of every generation but one (the GPU
picks its own generation's entry; the others' headers stay, their bytes compress to nothing),
leaves out the C API library (libonnxruntime.so, which Python does not load) and the TensorRT
provider, and writes the rest as an xz tarball in parts of at most --part-mib, with a JSON list of
the parts and their SHA-256. ``unpack`` checks the parts and extracts them into TARGET (a folder
for PYTHONPATH). ``libpath`` prints the folders of the NVIDIA pip packages (CUDA, cuBLAS, cuDNN)
for LD_LIBRARY_PATH, where the CUDA provider finds them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

CUDA_PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
LEFT_OUT = ("onnxruntime/capi/libonnxruntime.so", "onnxruntime/capi/libonnxruntime_providers_tensorrt.so")
FATBIN_MAGIC = 0xBA55ED50
MANIFEST = "ort-gpu.json"


def section(elf: bytearray, wanted: str) -> tuple[int, int]:
    """(file offset, size) of the 64-bit little-endian ELF section named ``wanted``."""
    if elf[:5] != b"\x7fELF\x02":
        raise ValueError("not a 64-bit ELF file")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i):  # name, type, flags, addr, offset, size, link, info, align, entsize
        return struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize)

    names = header(names_index)[4]
    for i in range(count):
        h = header(i)
        start = names + h[0]
        if elf[start:elf.index(0, start)].decode() == wanted:
            return h[4], h[5]
    raise ValueError(f"no section {wanted}")


def keep_one_generation(elf: bytearray, sm: int | None) -> dict:
    """Zero, in place, the payload of every .nv_fatbin entry not compiled for sm_``sm`` (None: keep all).

    The section is a run of fatbin containers (magic, version, header size, body size), each a run
    of entries (kind, version, header size, payload size, ..., the SM at byte 28 of the header)."""
    start, size = section(elf, ".nv_fatbin")
    end, pos = start + size, start
    kept = zeroed = entries = 0
    while pos + 16 <= end:
        magic, _, header_size, body = struct.unpack_from("<IHHQ", elf, pos)
        if magic != FATBIN_MAGIC:  # alignment between containers
            pos += 8
            continue
        entry, stop = pos + header_size, pos + header_size + body
        while entry < stop:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", elf, entry)
            arch = struct.unpack_from("<I", elf, entry + 28)[0]
            first = entry + entry_header
            if sm is None or arch == sm:
                kept += payload
            else:
                elf[first:first + payload] = bytes(payload)
                zeroed += payload
            entries += 1
            entry = first + payload
        pos = stop
    if not kept:
        raise ValueError(f"the CUDA provider has no kernels for sm_{sm}")
    return {"entries": entries, "kept_bytes": kept, "zeroed_bytes": zeroed}


def pack(wheel: Path, out: Path, sm: int | None, part_mib: int) -> dict:
    tar_bytes = io.BytesIO()
    facts = {}
    with zipfile.ZipFile(wheel) as zf, tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for info in zf.infolist():
            if info.is_dir() or info.filename.startswith(LEFT_OUT):
                continue
            data = bytearray(zf.read(info))
            if info.filename == CUDA_PROVIDER:
                facts = keep_one_generation(data, sm)
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), (info.external_attr >> 16) & 0o777 or 0o644
            tar.addfile(member, io.BytesIO(data))
    if not facts:
        raise ValueError(f"{wheel} has no {CUDA_PROVIDER}: is it an onnxruntime-gpu wheel?")
    print(f"compressing {tar_bytes.tell() / 2**20:.0f} MiB (a minute or two)", flush=True)
    packed = lzma.compress(tar_bytes.getvalue(), preset=9)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ort-gpu.tar.xz.*"):
        old.unlink()
    step = part_mib << 20
    parts = []
    for i in range(0, len(packed), step):
        name = f"ort-gpu.tar.xz.{len(parts) + 1}"
        (out / name).write_bytes(packed[i:i + step])
        parts.append({"file": name, "sha256": hashlib.sha256(packed[i:i + step]).hexdigest()})
    manifest = {"wheel": wheel.name, "sm": "all" if sm is None else sm, "bytes": len(packed), "parts": parts, **facts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(out: Path, target: Path) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    chunks = []
    for part in manifest["parts"]:
        path = out / part["file"]
        if not path.is_file():
            raise SystemExit(f"{path} has not arrived: carry it in a call before this one")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise SystemExit(f"{path} differs from the packed part: carry it again")
        chunks.append(data)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(b"".join(chunks))), mode="r") as tar:
        tar.extractall(target, filter="tar")
    print(f"{manifest['wheel']} (kernels for sm_{manifest['sm']}) unpacked into {target}")


def libpath() -> str:
    """The lib folders of the installed NVIDIA pip packages (nvidia/*/lib, nvidia/cu13/lib, ...)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec else []
    folders = {p.parent for root in roots for p in Path(root).rglob("lib*.so*") if p.parent.name.startswith("lib")}
    return ":".join(sorted(str(f) for f in folders))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("wheel", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--sm", default="90", help="the GPU generation to keep (90: H100 and H200), or 'all' "
                   "(the whole provider: about 185 MiB in parts, should a cut one fail)")
    a.add_argument("--part-mib", type=int, default=30)
    b = sub.add_parser("unpack")
    b.add_argument("out", type=Path)
    b.add_argument("target", type=Path)
    sub.add_parser("libpath")
    args = p.parse_args(argv)
    if args.command == "pack":
        m = pack(args.wheel, args.out, None if args.sm == "all" else int(args.sm), args.part_mib)
        print(f"{len(m['parts'])} parts, {m['bytes'] / 2**20:.1f} MiB in all; kept {m['kept_bytes'] / 1e6:.1f} MB "
              f"of sm_{m['sm']} kernels, zeroed {m['zeroed_bytes'] / 1e6:.1f} MB of other generations")
    elif args.command == "unpack":
        unpack(args.out, args.target)
    else:
        print(libpath())
    return 0


if __name__ == "__main__":
    sys.exit(main())
