"""edgelm on 64-bit ARM Linux, emulated: the operator library built for aarch64, its tests run
there, and the same artifacts' outputs on both machines.

    bash scripts/arm64_env.sh                     # once: qemu-user, arm64 Python, aarch64 wheels, zig
    .venv/bin/python benchmarks/arm64_check.py    # about 25 minutes on 2 cores (emulation)

1. build: edgelm's operator library cross-compiled by ``zig cc`` for aarch64-linux-gnu (glibc 2.36)
   with pyproject.toml's flags plus -Wall -Wextra -Werror; also compiled for 32-bit ARM
   (arm-linux-gnueabihf), not run.
2. tests: tests/test_native.py and tests/test_cached_attention.py (the kernels against numpy and
   inside ONNX Runtime) by pytest on the emulated aarch64 Python with ONNX Runtime's aarch64 wheel.
3. artifacts, exported and quantized here: the embedded GPT-2 and GPT-Neo in the default conv
   layout and the packed layout, the embedded GPT-2 quantized for ``--target arm64`` in the four
   modes, and the random-weight GPT-2 124M shape in the packed layout. On each machine: greedy
   tokens of three prompts, the logits of their prompt steps, and perplexity on the start of
   heldout.txt; compared side by side.

Steps 2 and 3 run on each emulated CPU of ``--cpus``: by default a Neoverse N1 (Armv8.2 with dot
product: Graviton 2, Ampere Altra) and qemu's ``max`` (Armv9 with SVE2, SME and int8 matrix
multiply, on which ONNX Runtime picks other kernels, KleidiAI's among them). qemu runs the ARM code paths, so results are checked; its timings say nothing about ARM
speed and are not reported. Writes results/arm64-check.json and .md; exits 1 when a test fails or an
fp32 artifact's generations differ from the host's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if "--emit" not in sys.argv:  # the ARM side imports the package tree built for it (PYTHONPATH)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))

ARM = HERE / ".cache" / "arm64"
NATIVE = HERE.parent / "edgelm" / "runtime" / "native"
PROMPTS = ["It was a truth universally acknowledged, that", "Emma Woodhouse, handsome, clever, and rich,",
           "The old man looked at the sea and"]
NEW_TOKENS = 24
PPL_CHARS = 2000  # the start of heldout.txt: about 450 tokens, one window (emulation is slow)
QUANT_MODES = ("int8-dynamic", "int8-static", "int8-weight", "int4-weight")
TESTS = ["tests/test_native.py", "tests/test_cached_attention.py"]


def outputs(folder: Path, new_tokens: int, ppl: bool) -> dict:
    """Greedy tokens and prompt-step logits of PROMPTS, and perplexity, of one artifact on this machine."""
    from edgelm.export.embedded import ASSETS
    from edgelm.manifest import read_manifest
    from edgelm.optimize.evaluate import onnx_perplexity, prompt_feed
    from edgelm.runtime import Generator, SamplingConfig
    from edgelm.runtime.artifact import kernels_as_exported

    kernels = kernels_as_exported(read_manifest(folder))  # each graph as exported
    gen = Generator.load(folder, kernels=kernels)
    art = gen.art
    cfg = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    out = {"tokens": [], "logits": []}
    for prompt in PROMPTS:
        out["tokens"].append(gen.generate(prompt, cfg).token_ids)
        ids = np.array([art.tokenizer.encode(prompt)], dtype=np.int64)
        out["logits"].append(art.session.run(["logits"], prompt_feed(art.manifest, ids, art.kv_dtype, 1))[0][0, -1])
    if ppl:
        text = (ASSETS / "text" / "heldout.txt").read_text()[:PPL_CHARS]
        out["perplexity"] = onnx_perplexity(folder, text, kernels=kernels).perplexity
    return out


def emit(args) -> None:
    """Runs on either machine: every artifact's outputs into args.emit (npz of logits + json)."""
    import platform

    import edgelm
    from edgelm.runtime import native

    done = {"machine": platform.machine(), "kernel_isa": native.kernel_isa(), "edgelm": edgelm.__file__, "artifacts": {}}
    logits = {}
    for spec in args.artifacts:
        name, folder, new_tokens, ppl = spec.split("=", 3)
        print(f"  {name}", file=sys.stderr, flush=True)
        got = outputs(Path(folder), int(new_tokens), ppl == "1")
        logits[name] = np.stack(got.pop("logits"))
        done["artifacts"][name] = got
    Path(args.emit).with_suffix(".json").write_text(json.dumps(done))
    np.savez(Path(args.emit).with_suffix(".npz"), **logits)


def zig_cc(target: str, out: Path) -> subprocess.CompletedProcess:
    sources = [str(NATIVE / f) for f in ("ops.c", "kernels.c", "attention.c")]
    cmd = [str(ARM / "zig" / "bin" / "python"), "-m", "ziglang", "cc", "-target", target, "-O3",
           "-fvisibility=hidden", "-std=c11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", *sources,
           "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True)


def build(pkg: Path) -> dict:
    """An edgelm package tree for aarch64 (its operator library cross-compiled), and the 32-bit build."""
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(HERE.parent / "edgelm", pkg / "edgelm", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(HERE.parent / "tests", pkg / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(HERE.parent / "pyproject.toml", pkg)
    result = {}
    for target, out in (("aarch64-linux-gnu.2.36", pkg / "edgelm/runtime/native/_edgelm_ops.cpython-311-aarch64-linux-gnu.so"),
                        ("arm-linux-gnueabihf.2.36", pkg / "armhf.so")):
        done = zig_cc(target, out)
        if done.returncode:
            raise SystemExit(f"zig cc for {target} failed:\n{done.stderr}")
        result[target] = {"warnings": done.stderr.count("warning:"), "bytes": out.stat().st_size}
    (pkg / "armhf.so").unlink()
    return result


def on_arm(pkg: Path, cpu: str, argv: list[str], timeout: int, show_progress: bool = False) -> subprocess.CompletedProcess:
    """``python3 argv`` on the emulated aarch64 Python (scripts/arm64_env.sh), qemu's CPU model ``cpu``;
    stdout captured, and stderr too unless ``show_progress``."""
    env = {**os.environ, "QEMU_CPU": cpu, "PYTHONPATH": f"{pkg}:{ARM / 'site'}"}
    return subprocess.run([str(ARM / "bin" / "python3"), *argv], cwd=pkg, env=env, stdout=subprocess.PIPE,
                          stderr=None if show_progress else subprocess.PIPE, text=True, timeout=timeout)


def artifacts(work: Path, with_124m: bool) -> dict:
    """name -> (folder, new tokens, perplexity or not), exported and quantized here; kept in ``work``
    (benchmarks/.cache/arm64-artifacts: delete it after a change to the export or the quantizer)."""
    from edgelm.export import export_model
    from edgelm.optimize import MeasureConfig, QuantizeConfig, quantize_artifact
    from runtime_bench import cached_artifact

    arts = {}
    for model in ("gpt2", "gpt-neo"):
        for layout in ("conv", "packed"):
            folder = work / f"{model}-{layout}"
            if not (folder / "manifest.json").is_file():
                export_model(f"embedded:{model}", folder, linear_layout=layout, force=True)
            arts[f"embedded {model}, {layout}"] = (folder, NEW_TOKENS, True)
    for mode in QUANT_MODES:
        folder = work / f"gpt2-arm64-{mode}"
        if not (folder / "manifest.json").is_file():
            # the gate is off (100%): this check compares the two machines, whatever the quality
            quantize_artifact(work / "gpt2-conv", folder, QuantizeConfig(mode=mode, target="arm64", max_ppl_increase=1.0),
                              MeasureConfig(new_tokens=8, repeats=1), force=True, progress=False)
        arts[f"embedded gpt2, arm64 {mode}"] = (folder, NEW_TOKENS, True)
    if with_124m:
        from configs import MODELS
        from random_checkpoint import ensure_model_folder

        model_dir = HERE / ".cache" / "gpt2"  # runtime_bench.py's folder
        ensure_model_folder(MODELS["gpt2"][1], model_dir)
        arts["gpt2 124M shape (random weights), packed"] = (cached_artifact(model_dir, "gpt2", "packed"), 4, False)
    return arts


def compare(host: dict, host_logits, arm: dict, arm_logits, cpu: str) -> list[dict]:
    rows = []
    for name, h in host["artifacts"].items():
        a = arm["artifacts"][name]
        hl, al = host_logits[name], arm_logits[name]
        same = [x == y for x, y in zip(h["tokens"], a["tokens"])]
        first_diff = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(h["tokens"], a["tokens"])]
        row = {"artifact": name, "cpu": cpu, "prompts": len(same), "new_tokens": len(h["tokens"][0]),
               "identical_generations": int(sum(same)), "first_differing_token": first_diff,
               "max_abs_logit_diff": float(np.abs(hl - al).max()), "logit_spread": float(hl.std()),
               "same_top_token": int((hl.argmax(-1) == al.argmax(-1)).sum())}
        if "perplexity" in h:
            row["perplexity_host"], row["perplexity_arm64"] = h["perplexity"], a["perplexity"]
        rows.append(row)
    return rows


def markdown(r: dict) -> str:
    lines = [
        "# edgelm on 64-bit ARM Linux (emulated by qemu-user)", "",
        f"Command: `{r['command']}` at commit {r['commit']}. Host: {r['host']['cpu']} ({r['host']['isa']}); "
        f"ARM side: {r['arm64']['machine']}, Debian's Python 3.11 under qemu-aarch64 {r['qemu']}, "
        f"onnxruntime {r['versions']['onnxruntime']} (aarch64 wheel), numpy {r['versions']['numpy']}; "
        f"edgelm's kernels there: `{r['arm64']['kernel_isa']}` (GCC/Clang 4-lane vectors, NEON).", "",
        "qemu runs the ARM code paths, so results are checked here; its timings say nothing about ARM speed.", "",
        "## Build (zig cc, -Wall -Wextra -Werror)", "",
    ]
    lines += [f"- {target}: {b['bytes']} bytes, {b['warnings']} warnings" for target, b in r["build"].items()]
    lines += ["", "## Tests on aarch64", ""]
    lines += [f"- {cpu}: `pytest {' '.join(TESTS)}`: **{t['summary']}** (exit code {t['returncode']})"
              for cpu, t in r["tests"].items()]
    lines += ["", "## The same artifacts on both machines", "",
              f"Greedy generations of {len(PROMPTS)} prompts; logits of their prompt steps; perplexity on the first "
              f"{PPL_CHARS} characters of heldout.txt. Quantized artifacts: `edgelm optimize quantize --target arm64 --mode MODE`.", "",
              "| artifact | emulated CPU | identical generations | max abs logit difference (logit spread) | same top token | perplexity x86-64 | perplexity aarch64 |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        ppl = (f"{row['perplexity_host']:.3f} | {row['perplexity_arm64']:.3f}" if "perplexity_host" in row else " | ")
        lines.append(f"| {row['artifact']} | {row['cpu']} | {row['identical_generations']} of {row['prompts']} ({row['new_tokens']} tokens) | "
                     f"{row['max_abs_logit_diff']:.2e} ({row['logit_spread']:.2f}) | {row['same_top_token']} of {row['prompts']} | {ppl} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-124m", action="store_true", help="skip the GPT-2 124M shape (its export takes a minute)")
    ap.add_argument("--cpus", default="neoverse-n1,max", help="qemu CPU models to run on (qemu-aarch64 -cpu help)")
    ap.add_argument("--out", default="arm64-check", help="file stem under benchmarks/results")
    ap.add_argument("--emit", help=argparse.SUPPRESS)  # internal: run on this machine, write outputs here
    ap.add_argument("artifacts", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emit:
        emit(args)
        return
    from common import RESULTS, commit, machine, versions

    if not (ARM / "bin" / "python3").is_file() or not (ARM / "site" / ".complete").is_file():
        raise SystemExit("the arm64 emulation is not set up: run bash scripts/arm64_env.sh first")
    started = time.time()
    work = HERE / ".cache" / "arm64-artifacts"
    work.mkdir(parents=True, exist_ok=True)
    pkg = ARM / "pkg"
    print("building the operator library for ARM ...", flush=True)
    built = build(pkg)
    cpus = args.cpus.split(",")
    tests = {}
    for cpu in cpus:
        print(f"running the native tests on aarch64 ({cpu}) ...", flush=True)
        done = on_arm(pkg, cpu, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], timeout=1800)
        summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
        tests[cpu] = {"summary": summary, "returncode": done.returncode,
                      "output_tail": done.stdout[-2000:] + done.stderr[-1000:]}
        print(f"  {summary}", flush=True)
    print("exporting and quantizing the artifacts here ...", flush=True)
    arts = artifacts(work, not args.no_124m)
    specs = [f"{name}={folder}={n}={int(ppl)}" for name, (folder, n, ppl) in arts.items()]
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        print("outputs on x86-64 ...", flush=True)
        subprocess.run([sys.executable, script, "--emit", f"{tmp}/host", *specs], check=True)
        host = json.loads(Path(f"{tmp}/host.json").read_text())
        rows = []
        for cpu in cpus:
            print(f"outputs on aarch64 ({cpu}, emulated) ...", flush=True)
            done = on_arm(pkg, cpu, [script, "--emit", f"{tmp}/{cpu}", *specs], timeout=3600,
                          show_progress=True)
            if done.returncode:
                raise SystemExit("the aarch64 run failed (its error is above)")
            arm = json.loads(Path(f"{tmp}/{cpu}.json").read_text())
            rows += compare(host, np.load(f"{tmp}/host.npz"), arm, np.load(f"{tmp}/{cpu}.npz"), cpu)
    qemu = subprocess.run([str(ARM / "qemu" / "qemu-aarch64"), "--version"], capture_output=True, text=True).stdout.split()[2]
    result = {"command": "python benchmarks/arm64_check.py" + (" --no-124m" if args.no_124m else "")
                         + (f" --cpus {args.cpus}" if args.cpus != "neoverse-n1,max" else ""),
              "commit": commit(), "host": machine(), "versions": versions(), "qemu": qemu,
              "arm64": {"machine": arm["machine"], "kernel_isa": arm["kernel_isa"], "edgelm": arm["edgelm"]}, "host_kernel_isa": host["kernel_isa"],
              "build": built, "tests": tests,
              "rows": rows, "seconds": round(time.time() - started, 1)}
    stem = RESULTS / args.out
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(text)
    fp32 = [r for r in rows if "arm64" not in r["artifact"]]  # quantized ones may round differently
    failed = any(t["returncode"] for t in tests.values()) or any(r["identical_generations"] < r["prompts"] for r in fp32)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
