"""The ``advface`` command line. Each subcommand lives beside the code it drives and
registers itself through a ``register(subparsers)`` function listed here."""

from __future__ import annotations

import argparse
import importlib
import sys

from .config_args import positive_int
from .threads import keep_freed_memory, torch_threads

# Modules that add subcommands: each defines register(subparsers) and sets a ``func`` default.
SUBCOMMAND_MODULES = [
    "advface_engine.commands",
    "advface_engine.evaluation.cli",
    "advface_engine.gallery.command",
    "advface_engine.speed.report",
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="advface", description="Privacy-preserving adversarial facial features.")
    parser.add_argument("--version", action="version", version=f"advface-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in dict.fromkeys(sub.choices.values()):  # aliases share their parser
        command.add_argument("--threads", type=positive_int, default=None, metavar="N",
                             help="torch CPU threads (default: one per core that is free when the command starts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; ``argv`` None means this process is the command (sys.argv), which then keeps its freed
    memory (``keep_freed_memory``); a command called in-process with its arguments leaves the allocator as is."""
    args = build_parser().parse_args(argv)
    if argv is None:
        keep_freed_memory()
    try:
        with torch_threads(args.threads):
            return int(args.func(args) or 0)
    except (ValueError, OSError, ImportError) as err:  # the user's input or environment: one line, no traceback
        print(f"advface {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
