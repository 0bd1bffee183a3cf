"""`kiln`: the project's one command line. One module per command, each `add_parser(commands)` and `run(args)`;
the heavy imports (torch, the build, the service) happen inside `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

from kiln.errors import KilnError

# What requirements-serve.txt leaves out (the build's exporters, quantizers, model zoos and plots)
LEFT_OUT_OF_SERVING = ("onnx", "onnxscript", "onnxruntime", "nncf", "timm", "transformers", "torchvision", "sympy",
                       "networkx", "skimage", "matplotlib", "open_clip", "peft", "spandrel", "accelerate",
                       "geventhttpclient", "gevent")  # the last two: tritonclient's HTTP client (it uses gRPC)

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
    except (ModuleNotFoundError, RuntimeError) as exc:  # diffusers wraps a missing module in a RuntimeError
        missing = _left_out(exc)
        if missing is None:
            raise
        print(f"kiln {args.command}: error: this needs {missing}, which the serving install (make setup-serve) "
              f"leaves out: it serves built repositories; `make setup` installs the builds and benchmarks too",
              file=sys.stderr)
        return 2


def _left_out(exc: BaseException | None) -> str | None:
    """The module of LEFT_OUT_OF_SERVING whose absence raised exc (or what caused it), else None."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in LEFT_OUT_OF_SERVING:
            return exc.name
        exc = exc.__cause__ or exc.__context__
    return None
