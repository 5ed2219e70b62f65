"""The ``edgelm`` command line: one subcommand per capability, registered by a small decorator.

Each subpackage keeps its commands in its own ``commands.py``; those modules import nothing
heavy at module level, so ``edgelm --help`` and the runtime commands start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable

from .errors import EdgelmError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}
COMMAND_MODULES = ("edgelm.export.commands", "edgelm.runtime.commands", "edgelm.optimize.commands")


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``run`` as ``edgelm NAME``; ``configure`` adds its arguments."""

    def register(run):
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    from . import __version__

    parser = _Parser(prog="edgelm", description="GPT-2 / GPT-Neo to fast, validated ONNX deployments.")
    parser.add_argument("--version", action="version", version=f"edgelm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except EdgelmError as exc:
        print(f"edgelm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"edgelm {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"edgelm {args.command}: error: out of memory; use a machine with more RAM or a smaller model",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
