"""`sinkguard` command line: align | finetune | repair | evaluate | analyze | run | report | judge | defenses."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import SinkguardError

# Each module defines `register(subparsers)`, which adds its sub-command with `func` set.
COMMAND_MODULES = (
    "sinkguard.commands.align",
    "sinkguard.commands.finetune",
    "sinkguard.commands.repair",
    "sinkguard.commands.evaluate",
    "sinkguard.commands.analyze",
    "sinkguard.commands.run",
    "sinkguard.commands.report",
    "sinkguard.commands.judge",
    "sinkguard.commands.defenses",
)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are two lines: a one-line usage and the error."""

    def error(self, message: str):
        usage = self.format_usage().strip()
        if "\n" in usage:
            usage = f"usage: {self.prog} [options] (see {self.prog} -h)"
        self.exit(2, f"{usage}\n{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command whose module is present."""
    parser = Parser(
        prog="sinkguard", description="Fine-tune LLMs on untrusted data without losing safety alignment."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn user mistakes into one error line (exit 2)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except SinkguardError as exc:
        print(f"sinkguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sinkguard: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
