"""Decode speed of a packed artifact with its weights in ONNX Runtime's mapping of model.onnx.data
against the same bytes in the process's own memory, in interleaved rounds.

    .venv/bin/python benchmarks/weight_memory_ab.py --model gpt2 --rounds 30 [--hugepages]

The runtime's `--weights` option (edgelm.runtime.artifact.WEIGHT_PLACEMENTS): "mapped" (the default)
lets ONNX Runtime map each external initializer from the page cache (4 KB pages of a file); "memory"
hands it the file's bytes, which it copies into its own memory while it builds the session.
With --hugepages a third session, "huge", gets every external initializer through
SessionOptions.add_external_initializers as numpy views of one private anonymous buffer, 2 MB
aligned, with transparent huge pages asked for by madvise (the result records how many the kernel
gave): whether huge pages add to the copy. Every session runs the same artifact; the script runs the
rounds twice, the sessions loaded in opposite orders, since the first loaded session can differ.
Writes results/weight_memory_ab-MODEL.json.
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


def huge_session(art: Path):
    """An ONNX Runtime session of ``art`` whose external weights live in one private anonymous buffer
    of transparent huge pages (a MAP_SHARED one would be shmem, which madvise does not give huge
    pages); the buffer and its OrtValues (which must outlive the session) come back with it."""
    import onnx
    import onnxruntime as ort

    from edgelm.runtime import native

    data = art / "model.onnx.data"
    size = data.stat().st_size
    buf = mmap.mmap(-1, size + ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
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


def rounds_once(art: Path, order: list[str], rounds: int) -> dict:
    from edgelm.runtime import Generator

    gens, keep = {}, []
    for kind in order:
        g = Generator.load(art, weights="memory" if kind == "memory" else "mapped")  # "huge" replaces its session
        if kind == "huge":
            g.art.session, held = huge_session(art)
            keep.append(held)
        gens[kind] = g
    huge_kb = anon_huge_kb()  # the read into the huge buffer has faulted all of it in
    rates = interleaved_decode_rounds(gens, rounds, warmup_tokens=33)
    return {"load_order": order, "anon_huge_pages_kb": huge_kb, "decode_tokens_per_s": rates,
            **{f"{kind}_over_mapped": per_round_ratio(rates, "mapped", kind) for kind in order if kind != "mapped"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--hugepages", action="store_true",
                   help="a third session: the weights in a buffer of transparent huge pages (madvise)")
    args = p.parse_args(argv)
    model_dir = CACHE / args.model
    ensure_model_folder(MODELS[args.model][1], model_dir)
    art = cached_artifact(model_dir, args.model, "packed")
    started = time.time()
    kinds = ["mapped", "memory"] + (["huge"] if args.hugepages else [])
    runs = [rounds_once(art, order, args.rounds) for order in (kinds, kinds[::-1])]
    result = {"model": args.model, "rounds": args.rounds, "hugepages": args.hugepages, "seconds": round(time.time() - started),
              "command": " ".join(["python", *sys.argv]), "machine": machine(), "versions": versions(), "commit": commit(),
              "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"weight_memory_ab-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        for kind in kinds[1:]:
            c = run[f"{kind}_over_mapped"]
            print(f"{args.model}, loaded {' then '.join(run['load_order'])}: {kind}/mapped per round median {c['median']:.3f} "
                  f"(quartiles {c['q25']:.3f}-{c['q75']:.3f}), {kind} faster in {c[f'rounds_{kind}_faster']} of {args.rounds}")
        print(f"  anonymous huge pages: {run['anon_huge_pages_kb']} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
