"""``edgelm bench``: its arguments and its run function (heavy imports happen inside run)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..cli import command
from ..runtime.options import PROVIDERS
from ..errors import InputError


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas, got '{text}'")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", metavar="ART", help="artifact folders made by 'edgelm export'")
    p.add_argument("--vs", type=_names, default=(), metavar="PEERS",
                   help="peers to compare with, comma-separated: pytorch, optimum, ctranslate2 (default: none)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (default 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row, EOS ignored (default 128)")
    p.add_argument("--batch", type=_int_list, default=(1, 8), help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per system and setting (default 5)")
    p.add_argument("--provider", choices=list(PROVIDERS), default="cpu", help="where every system runs (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every system (default: their own)")
    p.add_argument("--country", default=None,
                   help="ISO 3166 alpha-3 code of the grid for gCO2e, e.g. FRA, DEU (default $EDGELM_COUNTRY, else USA)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer for the bandwidth ceiling (default 1 GiB)")
    p.add_argument("--python-for", action="append", default=[], metavar="PEER=PYTHON",
                   help="run a peer with another environment's Python (repeatable), for peers whose packages "
                        "conflict with edgelm's")
    p.add_argument("--cache-dir", default=None,
                   help="where peers' converted models are kept (default ~/.cache/edgelm/bench)")
    p.add_argument("-o", "--output", default=None, metavar="REPORT_DIR",
                   help="write report.json, report.md and PNG charts into this folder")
    p.add_argument("--force", action="store_true", help="replace REPORT_DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the tables")


def settings_from_args(args):
    from .energy import default_country
    from .runner import BenchSettings

    python_for = []
    for item in args.python_for:
        peer, sep, python = item.partition("=")
        if not sep or not python:
            raise InputError(f"--python-for takes PEER=PYTHON, e.g. ctranslate2=/opt/ct2/bin/python; got '{item}'")
        python_for.append((peer.strip().lower(), python))
    if len(set(args.batch)) != len(args.batch):
        raise InputError(f"--batch lists a size twice ({','.join(map(str, args.batch))}); give each batch size once")
    return BenchSettings(peers=args.vs, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batches=args.batch,
                         repeats=args.repeats, provider=args.provider,
                         country=(args.country or default_country()).upper(), threads=args.threads,
                         bandwidth_gib=args.bandwidth_gib, python_for=tuple(python_for))


@command("bench", "Benchmark artifacts against PyTorch, Optimum and CTranslate2: speed, memory, energy.", _configure)
def run(args: argparse.Namespace) -> int:
    from .._fs import check_output
    from .energy import check_country
    from .report import markdown, write_report
    from .runner import run_bench

    settings = settings_from_args(args)
    if args.output:
        check_output(Path(args.output), args.force, inputs=args.artifacts)  # refuse before measuring anything
    check_country(settings.country, "--country" if args.country else "EDGELM_COUNTRY")
    cmd = "edgelm bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    report = run_bench(args.artifacts, settings, cache_dir=args.cache_dir, progress=not args.json, command=cmd)
    if args.output:
        write_report(report, args.output, force=args.force)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
        if args.output:
            print(f"report written to {args.output}/ (report.md, report.json, decode_speed.png, "
                  "energy_per_token.png, size.png)")
    failed = [r for r in report["records"] if r["system"] == "edgelm" and r["status"] != "ok"]
    return 1 if failed else 0
