"""`kiln`: the project's one command line. One module per command, each `add_parser(commands)` and `run(args)`;
the heavy imports (torch, the build, the service) happen inside `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

from kiln.errors import KilnError

COMMANDS = ("build", "weights", "finetune", "serve", "classify", "embed", "generate", "demo", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Compiled-inference serving on Triton: build, serve, "
                                                              "call, measure.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"kiln.cli.{name}").add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KilnError as exc:
        print(f"kiln {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return 130
