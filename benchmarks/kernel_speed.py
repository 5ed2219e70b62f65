"""Speed of edgelm's linear kernel per instruction set: decode (1 row), a batch (8) and a prompt (32).

    .venv/bin/python benchmarks/kernel_speed.py [--library OTHER.so --label NAME] [--rounds 7] [--out STEM]

Times edgelm_linear on GPT-2's MLP shape (K 768, N 3072, 9.4 MB of panels) over enough copies of the
weights to pass 1 GB per timing, so every weight comes from memory as in a decode step; all cores,
each on its share of the panels (ctypes lets go of the GIL). Each instruction set the CPU has runs
in its own process (EDGELM_KERNEL_ISA picks a lesser one); `generic` is the portable C kernel that
ARM CPUs run. With --library, another build of the operator library (for example the previous
commit's) runs in the same processes, the two alternating timing by timing, so a change to a kernel
is measured against the code before it in the same seconds. A previous commit's library:
    mkdir /tmp/prev && for f in ops.c kernels.c attention.c kernels.h ort_abi.h; do
      git show REV:edgelm/runtime/native/$f > /tmp/prev/$f; done
    gcc -O3 -fvisibility=hidden -std=c11 -shared -fPIC -o /tmp/prev/prev.so /tmp/prev/*.c -lm
The read bandwidth is measured between rounds (edgelm.bench.machine.measure_bandwidth). Writes results/STEM.json and .md (default
kernel_speed; name a run that a document cites, so a later run does not replace it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, machine, versions  # noqa: E402

K, N, ROWS = 768, 3072, (1, 8, 32)
WEIGHT_BYTES = (N // 16) * K * 16 * 4  # one packed K x N weight
COPIES = int(1e9 // WEIGHT_BYTES) + 1  # distinct copies per timing, so every pass reads from memory


def _time(libraries: list[str], rows: int, rounds: int) -> list[list[float]]:
    """Seconds per pass over all copies, per library, one per round, the libraries alternating
    (run inside the process of one instruction set)."""
    import ctypes
    import time
    from concurrent.futures import ThreadPoolExecutor

    libs = [ctypes.CDLL(path) for path in libraries]  # RTLD_LOCAL: each keeps its own symbols
    p, size = ctypes.c_void_p, ctypes.c_size_t
    for lib in libs:
        lib.edgelm_linear.argtypes = [p, size, size, p, p, p, size]
    threads = os.cpu_count() or 1
    panels = N // 16
    one = np.random.default_rng(0).standard_normal((panels, K, 16), dtype=np.float32) * 0.02
    copies = [one.copy() for _ in range(COPIES)]
    x = np.random.default_rng(1).standard_normal((rows, K), dtype=np.float32)
    bounds = [(panels * t // threads, panels * (t + 1) // threads) for t in range(threads)]
    outs = [np.empty((rows, (p1 - p0) * 16), np.float32) for p0, p1 in bounds]

    def share(lib, t: int) -> None:
        p0, p1 = bounds[t]
        for w in copies:
            lib.edgelm_linear(x.ctypes.data, rows, K, w[p0:].ctypes.data, None, outs[t].ctypes.data, (p1 - p0) * 16)

    seconds = [[] for _ in libs]
    with ThreadPoolExecutor(threads) as pool:
        for lib in libs:  # warm-up
            list(pool.map(lambda t: share(lib, t), range(threads)))
        for r in range(rounds):
            for i in (range(len(libs)) if r % 2 == 0 else reversed(range(len(libs)))):
                start = time.perf_counter()
                list(pool.map(lambda t: share(libs[i], t), range(threads)))
                seconds[i].append(time.perf_counter() - start)
    return seconds


def _child(args) -> int:
    print(json.dumps({str(r): _time(args.child_library, r, args.rounds) for r in ROWS}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", help="another build of the operator library, timed in alternation with this one")
    p.add_argument("--label", default="other", help="its name in the results")
    p.add_argument("--rounds", type=int, default=7, help="timings per process (median taken)")
    p.add_argument("--repeats", type=int, default=3, help="processes per library and instruction set, alternating")
    p.add_argument("--out", default="kernel_speed", help="results/OUT.json and .md (default kernel_speed)")
    p.add_argument("--child-library", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_library:
        return _child(args)

    from edgelm.bench.machine import measure_bandwidth
    from edgelm.runtime import native

    if args.library and not Path(args.library).is_file():
        p.error(f"--library {args.library}: no such file; build the other library first (see this script's docstring)")
    here = str(native.require())
    libraries = {"this": here} | ({args.label: str(Path(args.library).resolve())} if args.library else {})
    isas = ["generic", "avx2", "avx512f"]
    isas = isas[: isas.index(native.kernel_isa()) + 1]
    nbytes = WEIGHT_BYTES * COPIES
    seconds = {lib: {isa: {str(r): [] for r in ROWS} for isa in isas} for lib in libraries}
    bandwidths = [measure_bandwidth(passes=3)]
    for repeat in range(args.repeats):
        for isa in isas:
            out = subprocess.run([sys.executable, __file__, "--child-library", *libraries.values(), "--rounds", str(args.rounds)],
                                 env={**os.environ, "EDGELM_KERNEL_ISA": isa}, capture_output=True, text=True, check=True)
            for r, per_library in json.loads(out.stdout).items():
                for lib, secs in zip(libraries, per_library):
                    seconds[lib][isa][r] += secs
            print(f"repeat {repeat + 1}/{args.repeats} {isa}", flush=True)
        bandwidths.append(measure_bandwidth(passes=3))
    rows = []
    for lib in libraries:
        for isa in isas:
            for r in ROWS:
                t = float(np.median(seconds[lib][isa][str(r)]))
                rows.append({"library": lib, "isa": isa, "rows": r, "ms_per_gb": t * 1e3 * 1e9 / nbytes,
                             "gbps": nbytes / t / 1e9, "gflops": 2 * r * K * N * COPIES / t / 1e9})
    if args.library:
        for row in rows:
            if row["library"] != "this":
                base = next(b for b in rows if b["library"] == "this" and b["isa"] == row["isa"] and b["rows"] == row["rows"])
                base[f"speedup_over_{args.label}"] = row["ms_per_gb"] / base["ms_per_gb"]
    result = {"command": "python benchmarks/kernel_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "versions": versions(), "commit": commit(), "shape": {"k": K, "n": N},
              "weight_bytes_per_timing": nbytes, "bandwidth_gbps": bandwidths, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = _markdown(result, args.label if args.library else None)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)
    return 0


def _markdown(r: dict, other: str | None) -> str:
    lines = ["# edgelm_linear per instruction set (K 768, N 3072, weights from memory)", "",
             f"Command: `{r['command']}` at commit {r['commit']}. Machine: {r['machine']['cpu']}, {r['machine']['cpus']} cores "
             f"({r['machine']['isa']}). Read bandwidth between rounds: {', '.join(f'{b:.1f}' for b in r['bandwidth_gbps'])} GB/s.",
             "", "Medians over every timing; `generic` is the portable C kernel (what ARM CPUs run).", "",
             "| library | isa | rows | GB/s of weights | GFLOP/s |" + (f" speed-up over {other} |" if other else ""),
             "| --- | --- | --- | --- | --- |" + (" --- |" if other else "")]
    for row in r["rows"]:
        extra = f" {row[f'speedup_over_{other}']:.2f}x |" if other and f"speedup_over_{other}" in row else (" |" if other else "")
        lines.append(f"| {row['library']} | {row['isa']} | {row['rows']} | {row['gbps']:.1f} | {row['gflops']:.1f} |{extra}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
