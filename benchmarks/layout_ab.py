"""Decode speed of two linear layouts of one model, in many short interleaved rounds.

    .venv/bin/python benchmarks/layout_ab.py --model gpt2 --rounds 60                    # conv vs matmul
    .venv/bin/python benchmarks/layout_ab.py --model gpt2 --rounds 60 --layouts conv,packed
    .venv/bin/python benchmarks/layout_ab.py --model gpt2 --layouts packed,packed --baseline OLD_ARTIFACT --label old

With ``--baseline``, A is that artifact folder instead of a fresh export (an earlier edgelm's export
of the same model, say), named ``--label`` in the results.

ONNX Runtime maps each artifact's model.onnx.data, so a session reads its weights from the page
cache's pages of that file, and two files are two placements in memory: two byte-identical copies
of one artifact can decode a few percent apart (``--separate-pages`` with a copy as ``--baseline``
shows it). When A's and B's data files hold the same bytes (graph-only changes), B runs from a
folder of links to its files whose data file is a hard link to A's, so both sessions read the
same pages.

The same random-weight model exported twice (`edgelm export --linear-layout A` and `B`), both
loaded in one process; each round generates 32 greedy tokens with each, in shuffled order.
Speeds on this shared machine drift by +-20% within minutes, so the figure is the median of the
per-round ratios B / A (with quartiles). Writes benchmarks/results/layout_ab-MODEL.json for the
default pair (matmul, conv), else layout_ab-MODEL-B-A.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, ab_line, ab_record, interleaved_decode_rounds  # noqa: E402
from configs import MODELS  # noqa: E402
from random_checkpoint import ensure_model_folder  # noqa: E402
from runtime_bench import cached_artifact, load_as_exported  # noqa: E402

CACHE = HERE / ".cache"
DEFAULT_LAYOUTS = "matmul,conv"


def _sharing_pages(a: Path, b: Path) -> tuple[Path, bool]:
    """B's folder, or a folder that stands for it and reads A's weight pages when the two data files
    hold the same bytes; and whether they share pages."""
    import filecmp
    import os

    da, db = a / "model.onnx.data", b / "model.onnx.data"
    if not (da.is_file() and db.is_file()):
        return b, False
    if os.path.samefile(da, db):
        return b, True
    if da.stat().st_size != db.stat().st_size or not filecmp.cmp(da, db, shallow=False):
        return b, False
    view = CACHE / "artifacts" / f"{b.name}-pages-of-{a.name}"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for f in b.iterdir():
        if f.name == "model.onnx.data":
            os.link(da, view / f.name)
        else:
            (view / f.name).symlink_to(f.resolve())
    return view, True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--new-tokens", type=int, default=33, help="per generation (the first is the prompt step)")
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="A,B: the baseline and the layout compared with it")
    p.add_argument("--baseline", type=Path, help="an artifact folder to run as A (in place of A's fresh export)")
    p.add_argument("--label", default="baseline", help="A's name in the results, with --baseline")
    p.add_argument("--separate-pages", action="store_true",
                   help="B reads its own data file even when it holds A's bytes (shows what placement alone does)")
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    if args.baseline:
        if not (args.baseline / "manifest.json").is_file():
            p.error(f"--baseline {args.baseline} is not an artifact folder (no manifest.json); give an exported folder")
        layouts[0] = args.label
    if len(layouts) != 2 or len(set(layouts)) != 2:
        p.error(f"--layouts takes two different layouts, as A,B (with --baseline, a --label other than B); got {args.layouts!r}")
    base, other = layouts

    model_dir = CACHE / args.model
    ensure_model_folder(MODELS[args.model][1], model_dir)
    folders = {layout: args.baseline if args.baseline and layout == base else cached_artifact(model_dir, args.model, layout)
               for layout in layouts}
    shared = False
    if not args.separate_pages:
        folders[other], shared = _sharing_pages(folders[base], folders[other])
    gens = {layout: load_as_exported(folders[layout]) for layout in layouts}
    started = time.time()
    rates = interleaved_decode_rounds(gens, args.rounds, args.new_tokens)
    result = ab_record(args.model, args.rounds, args.new_tokens, started, rates, [(base, other)],
                       baseline_artifact=str(args.baseline) if args.baseline else None, weights_share_pages=shared)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.layouts == DEFAULT_LAYOUTS and not args.baseline else f"-{other}-{base}"
    (RESULTS / f"layout_ab-{args.model}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(ab_line(result, base, other))
    return 0


if __name__ == "__main__":
    sys.exit(main())
