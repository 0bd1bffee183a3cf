"""`kiln classify`: top-k labels for images, through the vit_classify ensemble."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kiln.cli.args import add_triton_address, at_least
from kiln.errors import KilnError


def add_parser(commands) -> None:
    classify = commands.add_parser("classify", help="top-k labels for images (the build's own), through vit_classify")
    classify.add_argument("images", nargs="+")
    add_triton_address(classify)
    classify.add_argument("--top-k", type=at_least(1), default=5)
    classify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    classify.set_defaults(run=run)


def run(args) -> int:
    from kiln.vit import ViTClient

    results = ViTClient(args.url, args.protocol).classify(read_images(args.images), top_k=args.top_k)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print_classifications(results)
    return 1 if any(r.error for r in results) else 0


def read_images(paths: Sequence[str | Path]) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file; a missing one is an error before anything is sent."""
    out = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise KilnError(f"{p}: no such image file")
        out.append((str(p), p.read_bytes()))
    return out


def print_classifications(results, indent: str = "", name=str) -> None:
    """The human-readable form `kiln classify` and `kiln demo` print: the image, then its ranked labels."""
    for r in results:
        print(f"{indent}{name(r.image)}")
        if r.error:
            print(f"{indent}  error: {r.error}")
            continue
        for rank, (label, score) in enumerate(zip(r.labels, r.scores), 1):
            print(f"{indent}  {rank}. {score:7.4f}  {label}")
