"""Argument types and option groups more than one command uses."""

from __future__ import annotations

import argparse
import math


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, e.g. 1,8."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def size_list(text: str) -> tuple[tuple[int, int], ...]:
    """Comma-separated WIDTHxHEIGHT sizes, e.g. 4032x3024,1920x1080; "none" for none."""
    if text.strip().lower() == "none":
        return ()
    sizes = []
    for item in (v.strip().lower() for v in text.split(",") if v.strip()):
        width, _, height = item.partition("x")
        if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            raise argparse.ArgumentTypeError(f"expected comma-separated WIDTHxHEIGHT sizes, got {item!r}")
        sizes.append((int(width), int(height)))
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected comma-separated WIDTHxHEIGHT sizes or none, got {text!r}")
    return tuple(sizes)


def at_least(low: float, kind: type = int):
    """An argparse type: a finite number (int or float) of at least low, e.g. at_least(0) for --threads (0: all
    cores)."""
    return _number(kind, lambda value: value >= low, f"at least {low}")


def above(low: float):
    """An argparse type: a finite float above low, e.g. above(0) for a timeout in seconds."""
    return _number(float, lambda value: value > low, f"above {low}")


def _number(kind: type, within, bound: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not within(value):  # nan is within nothing
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names, blanks dropped."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_triton_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="Triton address host:port (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
