"""Where does the builder export's peak memory come from? Run its phases in one process and measure each.

    .venv/bin/python benchmarks/export_phases.py gpt-neo-2.7B [--json out.json]

Calls edgelm's own ``export_model`` (builder, fp32, validation on: what `edgelm export` runs) and takes
a mark before and after each function it calls, by wrapping them: build_graph (and, inside it, the
graph's final serialization), release_memory, count_ops, validate.torch_reference (and inside it
load_torch_model), validate.onnx_outputs (and inside it the InferenceSession), validate.compare,
file_table. The wrappers follow the pipeline as it changes; a function it no longer calls is just
not marked.

For every interval between two marks it prints the peak RSS within the interval (the kernel's VmHWM,
reset at each mark by writing 5 to /proc/self/clear_refs) and the RSS at the mark, with the anonymous
and file-backed parts (a 0.05 s sampling thread records the split at the peak). Ratios are to the
fp32 weight bytes. The model is a folder, or a name from benchmarks/configs.py (its cached folder
under benchmarks/.cache/, written by export_bench.py or here).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from edgelm.bench.energy import reset_peak_rss  # noqa: E402  (the high-water mark, reset at each mark)


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class Tracker:
    def __init__(self, weight_bytes: int):
        self.weight_bytes = weight_bytes
        self.marks: list[dict] = []
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._peak = {"VmRSS": 0}
        self._lock = threading.Lock()
        self._stop = False
        self.hwm_resettable = reset_peak_rss()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop:
            s = status()
            with self._lock:
                if s["VmRSS"] > self._peak["VmRSS"]:
                    self._peak = s
            time.sleep(0.05)

    def mark(self, label: str) -> None:
        s = status()
        with self._lock:
            sampled = self._peak
            self._peak = {"VmRSS": 0}
        peak = max(s["VmHWM"], sampled["VmRSS"]) if self.hwm_resettable else sampled["VmRSS"]
        now = time.perf_counter()
        row = {"interval": label, "seconds": round(now - self._last, 2), "peak_rss": peak,
               "peak_ratio": peak / self.weight_bytes,
               "peak_anon_sampled": sampled.get("RssAnon"), "peak_file_sampled": sampled.get("RssFile"),
               "rss_after": s["VmRSS"], "anon_after": s["RssAnon"], "file_after": s["RssFile"],
               "after_ratio": s["VmRSS"] / self.weight_bytes}
        self.marks.append(row)
        print(f"{label:<58} {row['seconds']:7.1f} s  peak {peak / 1e9:6.2f} GB ({row['peak_ratio']:.2f}x)"
              f"  [anon {(sampled.get('RssAnon') or 0) / 1e9:5.2f} file {(sampled.get('RssFile') or 0) / 1e9:5.2f}]"
              f"  after {s['VmRSS'] / 1e9:6.2f} GB ({row['after_ratio']:.2f}x)", flush=True)
        self._last = time.perf_counter()
        if self.hwm_resettable:
            reset_peak_rss()
        with self._lock:
            self._peak = status()

    def stop(self):
        self._stop = True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model folder, or a name from benchmarks/configs.py")
    ap.add_argument("--json", type=Path, help="also write the marks here")
    ap.add_argument("--no-arena", action="store_true",
                    help="experiment: ONNX Runtime sessions without the CPU memory arena (enable_cpu_mem_arena=0)")
    args = ap.parse_args(argv)

    import configs
    import random_checkpoint as RC

    if args.model in configs.MODELS:
        folder = HERE / ".cache" / args.model
        RC.ensure_model_folder(configs.MODELS[args.model][1], folder)
    else:
        folder = Path(args.model)

    import onnxruntime as ort

    from edgelm.export import graph as G
    from edgelm.export import pipeline as P
    from edgelm.export import torch_model as TM
    from edgelm.export import validate as V
    from edgelm.export.checkpoint import open_checkpoint

    from export_bench import edgelm_state

    source = edgelm_state()  # before the run: the code that runs
    weight_bytes = open_checkpoint(folder).nbytes_fp32()
    print(f"{folder.name}: {weight_bytes / 1e9:.2f} GB fp32 weights; ratios below are to that", flush=True)
    t = Tracker(weight_bytes)
    if not t.hwm_resettable:
        print("(cannot reset VmHWM here: peaks are from 0.05 s sampling only)")
    t.mark("start: imports (onnxruntime, onnx, numpy, edgelm.export)")
    held = {}

    def wrap(owner, name, label, keep=None):
        original = getattr(owner, name, None)
        if original is None:
            return

        def counted(steps):  # a generator's steps are counted as its consumer takes them
            held[keep] = 0
            for step in steps:
                held[keep] += sum(x.nbytes for _, x in step.items())
                yield step

        def wrapper(*a, **k):
            t.mark(f"... up to {label.strip()}")
            result = original(*a, **k)
            t.mark(label)
            if keep and inspect.isgenerator(result):
                return counted(result)
            if keep:
                held[keep] = sum(x.nbytes for step in result for _, x in step.items())
            return result

        setattr(owner, name, wrapper)

    wrap(P, "build_graph", "build_graph (read, lay out, write every weight)")
    wrap(G.GraphBuilder, "save", "  build_graph: GraphBuilder.save (serialize the protobuf)")
    wrap(P, "release_memory", "release_memory (gc + malloc_trim)")
    wrap(P, "count_ops", "count_ops")
    wrap(V, "torch_reference", "torch_reference (whole phase; model freed at the end)", keep="reference")
    wrap(TM, "load_torch_model", "  torch_reference: load_torch_model")
    wrap(V, "onnx_outputs", "onnx_outputs (whole phase; session freed at the end)", keep="candidate")
    wrap(V, "compare", "compare")
    wrap(P, "file_table", "file_table (sha256 of the artifact)")

    class Session(ort.InferenceSession):
        def __init__(self, *a, **k):
            t.mark("... up to InferenceSession")
            super().__init__(*a, **k)
            t.mark("  onnx_outputs: InferenceSession created")

    ort.InferenceSession = Session
    if args.no_arena:
        class Options(ort.SessionOptions):
            def __init__(self):
                super().__init__()
                self.enable_cpu_mem_arena = False

        ort.SessionOptions = Options
        print("experiment: ONNX Runtime's CPU memory arena switched off")

    work = Path(tempfile.mkdtemp(prefix=f"phases-{folder.name}-", dir=HERE / ".cache"))
    verdict = "passed"
    try:
        try:
            manifest = P.export_model(str(folder), work / "artifact", force=True, progress=False)
            diffs = manifest["validation"].get("max_abs_diff") or {}
            verdict = f"validation {manifest['validation']['status']}, largest max abs diff {max(diffs.values()):.3g}"
        except Exception as exc:  # a ValidationError still leaves the memory picture
            verdict = f"export FAILED: {type(exc).__name__}: {str(exc)[:200]}"
        t.mark("end of export_model")
    finally:
        t.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(verdict)
    for key, nbytes in held.items():
        print(f"{key} outputs held for the comparison: {nbytes / 1e9:.2f} GB ({nbytes / weight_bytes:.2f}x)")
    worst = max(t.marks, key=lambda m: m["peak_rss"])
    print(f"peak of the whole run: {worst['peak_rss'] / 1e9:.2f} GB ({worst['peak_ratio']:.2f}x the fp32 weights), "
          f"in the interval ending at: {worst['interval']}")
    if args.json:
        import shlex

        args.json.write_text(json.dumps({"model": folder.name, "weight_bytes": weight_bytes, "verdict": verdict,
                                         "command": shlex.join([".venv/bin/python", "benchmarks/export_phases.py"]
                                                               + (argv if argv is not None else sys.argv[1:])),
                                         "edgelm_source": source, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "held_outputs_bytes": held, "marks": t.marks}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
