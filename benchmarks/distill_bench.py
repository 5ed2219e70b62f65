"""Distillation benchmark: a half-depth student of each trained reference model, 20 CPU minutes each.

    .venv/bin/python benchmarks/distill_bench.py                 # the committed run (about 45 minutes)
    .venv/bin/python benchmarks/distill_bench.py --minutes 2     # a smoke run

For the embedded GPT-2 and GPT-Neo (4 layers x 256, trained on the Austen novels), the student keeps 2
layers chosen by ``edgelm optimize distill --student-layers 2`` (GPT-2: layers 0 and 3; GPT-Neo: a
global and a local layer) and trains for a fixed wall-clock budget on the training split
(benchmarks/data/austen-train.txt, the text before edgelm/assets/text/heldout.txt), with the default
settings. Perplexity is measured on the held-out text in 128-token windows, stride 64 (the models were
trained on 128-token sequences), for the teacher, the truncated student before training, and after.

Target (issue 5): the student closes at least half of the perplexity gap between the untrained
truncated student and the teacher. Writes benchmarks/results/distill.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, commit, machine, versions, write_results  # noqa: E402

TRAIN_TEXT = HERE / "data" / "austen-train.txt"
TARGET_GAP_CLOSED = 0.5


def run(models: list[str], minutes: float, precision: str) -> dict:
    from edgelm.optimize.distill import distill_model
    from edgelm.optimize.train import TrainConfig

    rows = []
    for name in models:
        with tempfile.TemporaryDirectory(prefix="edgelm-distill-bench-") as tmp:
            cfg = TrainConfig(minutes=minutes, precision=precision)
            print(f"== {name}: {minutes} minutes", flush=True)
            record = distill_model(f"embedded:{name}", Path(tmp) / "student", TRAIN_TEXT, cfg, student_layers="2")
        closed = record["perplexity"]["gap_closed"]
        rows.append({"model": name, "record": record,
                     "target": "PASS" if closed is not None and closed >= TARGET_GAP_CLOSED else "FAIL"})
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "minutes": minutes,
            "machine": machine(), "versions": versions(), "commit": commit(), "rows": rows,
            "command": " ".join(["benchmarks/distill_bench.py", *sys.argv[1:]])}


def markdown(result: dict) -> str:
    lines = [f"# Distillation: half-depth students, {result['minutes']:g} CPU minutes each",
             "", f"`.venv/bin/python {result['command']}` on {result['machine']['cpu']} "
             f"({result['machine']['cpus']} cores, {result['machine']['isa']}), commit {result['commit']}, "
             f"{result['created']}.", "",
             "Held-out text (edgelm/assets/text/heldout.txt), 128-token windows, stride 64. Gap closed = "
             "(student before - student after) / (student before - teacher), target >= 50%.", "",
             "| model | student layers (kinds) | params teacher -> student | steps | tokens | tok/s | precision "
             "| ppl teacher | ppl student before | ppl student after | gap closed | energy | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        r, t, p = row["record"], row["record"]["training"], row["record"]["perplexity"]
        energy = r["energy"]
        joules = f"{energy['joules']:.0f} J" if energy.get("joules") is not None else "not measured"
        lines.append(
            f"| {row['model']} | {r['student_layers']} ({', '.join(r['student_layer_kinds'])}) | "
            f"{r['parameters']['teacher'] / 1e6:.1f}M -> {r['parameters']['student'] / 1e6:.1f}M | {t['steps_done']} | "
            f"{t['tokens']} | {t['tokens_per_s']:.0f} | {t['precision_used']} | {p['teacher']:.2f} | "
            f"{p['student_before']:.2f} | {p['student_after']:.2f} | {100 * p['gap_closed']:.1f}% | {joules} | "
            f"{row['target']} |")
    lines += ["", "Energy: CodeCarbon, " + (result["rows"][0]["record"]["energy"].get("method") or "see JSON"), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for row in result["rows"]:
        h = row["record"]["training"]["history"]
        a.plot([x["step"] for x in h], [x["ce"] for x in h], label=f"{row['model']} next-token loss")
    a.set_xlabel("step")
    a.set_ylabel("training cross-entropy (nats)")
    a.set_title("Student training loss")
    a.legend()
    names = [row["model"] for row in result["rows"]]
    width = 0.25
    for k, (key, label) in enumerate((("teacher", "teacher (4 layers)"), ("student_before", "student, untrained"),
                                      ("student_after", "student, distilled"))):
        vals = [row["record"]["perplexity"][key] for row in result["rows"]]
        b.bar([i + (k - 1) * width for i in range(len(names))], vals, width, label=label)
    b.set_xticks(range(len(names)), names)
    b.set_ylabel("held-out perplexity")
    b.set_title(f"Half-depth students after {result['minutes']:g} CPU minutes")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,gpt-neo")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--out", default=str(RESULTS / "distill"), help="path stem of the result files")
    args = ap.parse_args()
    result = run(args.models.split(","), args.minutes, args.precision)
    print(write_results(Path(args.out), result, markdown, plot))
    return 0 if all(r["target"] == "PASS" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
