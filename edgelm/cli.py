"""The ``edgelm`` command line: one subcommand per capability, registered by a small decorator.

Each subpackage keeps its commands in its own ``commands.py``; those modules import nothing
heavy at module level, so ``edgelm --help`` and the runtime commands start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from ._fs import no_space, os_error
from .errors import EdgelmError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}
COMMAND_MODULES = ("edgelm.export.commands", "edgelm.runtime.commands", "edgelm.optimize.commands",
                   "edgelm.bench.commands")


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``run`` as ``edgelm NAME``; ``configure`` adds its arguments.

    A name with a space ("optimize quantize") becomes a step under a command group.
    """

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
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS.values():
        group, _, leaf = cmd.name.rpartition(" ")  # "optimize quantize" -> group "optimize"
        where = sub
        if group:
            if group not in groups:
                g = sub.add_parser(group, help=f"{group} steps (see edgelm {group} --help)")
                groups[group] = g.add_subparsers(dest="step", metavar="STEP", parser_class=_Parser)
                g.set_defaults(_group=g)
            where = groups[group]
        p = where.add_parser(leaf, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run, _name=cmd.name)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed terminal or SSH session), raised where the program is, so that
    partial outputs are removed as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        getattr(args, "_group", parser).print_help()
        return 2
    name = args._name
    try:  # `edgelm serve` sets its own handler (finish the requests in flight)
        previous = {signum: signal.signal(signum, _terminate) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        return int(args._run(args) or 0)
    except (EdgelmError, OSError) as exc:
        # a full disk outside an output folder (atomic_output_dir names the output's device itself)
        error = exc if isinstance(exc, EdgelmError) else no_space(exc) or os_error(exc)
        print(f"edgelm {name}: error: {error}", file=sys.stderr)
        return error.exit_code
    except Terminated as exc:
        print(f"edgelm {name}: terminated; no output was written", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"edgelm {name}: interrupted; no output was written", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"edgelm {name}: error: out of memory; use a machine with more RAM or a smaller model",
              file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
