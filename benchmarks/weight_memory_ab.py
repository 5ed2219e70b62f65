"""Decode speed with the weights where ONNX Runtime puts them (its mapping of model.onnx.data) against
the same bytes copied into the process's own anonymous memory, in interleaved rounds.

    .venv/bin/python benchmarks/weight_memory_ab.py --model gpt2 --rounds 30 [--hugepages]

A lead for the memory-bandwidth ceiling, not a runtime feature yet: ONNX Runtime maps each external
initializer from the page cache (4 KB pages of a file), and where those pages lie moves decode speed
by a few percent (benchmarks/layout_ab.py --separate-pages). Here the "copied" session gets every
external initializer through SessionOptions.add_external_initializers, as numpy views of one
anonymous buffer read from the same file (2 MB aligned; --hugepages asks for transparent huge pages
with madvise, and the result records how many the kernel gave). Both sessions run the same packed
artifact; the script runs the rounds twice, loading "mapped" first and then "copied" first, since the
first loaded session can differ. Writes results/weight_memory_ab-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, interleaved_decode_rounds, machine, per_round_ratio, versions  # noqa: E402
from configs import MODELS  # noqa: E402
from random_checkpoint import ensure_model_folder  # noqa: E402
from runtime_bench import CACHE, cached_artifact  # noqa: E402

ALIGN = 2 << 20


def copied_session(art: Path, hugepages: bool):
    """An ONNX Runtime session of ``art`` whose external weights live in one anonymous buffer; the buffer
    and its OrtValues (which must outlive the session) come back with it."""
    import onnx
    import onnxruntime as ort

    from edgelm.runtime import native

    data = art / "model.onnx.data"
    size = data.stat().st_size
    buf = mmap.mmap(-1, size + ALIGN)
    if hugepages:
        buf.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(buf, dtype=np.uint8)
    base = (-raw.ctypes.data) % ALIGN
    with open(data, "rb") as f:
        f.readinto(memoryview(buf)[base:base + size])
    names, values = [], []
    for t in onnx.load(str(art / "model.onnx"), load_external_data=False).graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in t.external_data}
            start = base + int(entry.get("offset", 0))
            view = raw[start:start + int(entry["length"])].view(np.float32).reshape(tuple(t.dims))
            names.append(t.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(view))
    opts = ort.SessionOptions()
    native.register(opts)
    opts.add_external_initializers(names, values)
    return ort.InferenceSession(str(art / "model.onnx"), opts, providers=["CPUExecutionProvider"]), (buf, values)


def anon_huge_kb() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def rounds_once(art: Path, order: list[str], rounds: int, hugepages: bool) -> dict:
    from edgelm.runtime import Generator

    gens, keep = {}, []
    for kind in order:
        g = Generator.load(art)
        if kind == "copied":
            g.art.session, held = copied_session(art, hugepages)
            keep.append(held)
        gens[kind] = g
    huge_kb = anon_huge_kb()  # the read into the copied buffer has faulted all of it in
    rates = interleaved_decode_rounds(gens, rounds, warmup_tokens=33)
    return {"load_order": order, "anon_huge_pages_kb": huge_kb, "decode_tokens_per_s": rates,
            "copied_over_mapped": per_round_ratio(rates, "mapped", "copied")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--hugepages", action="store_true", help="madvise(MADV_HUGEPAGE) on the copied weights")
    args = p.parse_args(argv)
    model_dir = CACHE / args.model
    ensure_model_folder(MODELS[args.model][1], model_dir)
    art = cached_artifact(model_dir, args.model, "packed")
    started = time.time()
    runs = [rounds_once(art, order, args.rounds, args.hugepages) for order in (["mapped", "copied"], ["copied", "mapped"])]
    result = {"model": args.model, "rounds": args.rounds, "hugepages": args.hugepages, "seconds": round(time.time() - started),
              "command": " ".join(["python", *sys.argv]), "machine": machine(), "versions": versions(), "commit": commit(),
              "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"weight_memory_ab-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        c = run["copied_over_mapped"]
        print(f"{args.model}, loaded {' then '.join(run['load_order'])}: copied/mapped per round median {c['median']:.3f} "
              f"(quartiles {c['q25']:.3f}-{c['q75']:.3f}), copied faster in {c['rounds_copied_faster']} of {args.rounds}; "
              f"anonymous huge pages {run['anon_huge_pages_kb']} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
