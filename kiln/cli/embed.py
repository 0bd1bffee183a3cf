"""`kiln embed`: ViT features for images, through the vit_embed ensemble."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.cli.args import add_triton_address
from kiln.cli.classify import read_images


def add_parser(commands) -> None:
    embed = commands.add_parser("embed", help="ViT features for images, through vit_embed")
    embed.add_argument("images", nargs="+")
    add_triton_address(embed)
    embed.add_argument("--layer", type=int, default=-1,
                       help="block whose tokens to return: 0..depth-1 (0..11 for ViT-B/16), or -1 for the last")
    embed.add_argument("--tokens", choices=("cls", "all"), default="cls",
                       help="cls: the pooled embedding (768-d for ViT-B); all: also the tokens of --layer (197x768)")
    embed.add_argument("--json", action="store_true", help="print JSON with the values")
    embed.add_argument("--out", type=Path, help="also save each result as .npy files in this folder")
    embed.set_defaults(run=run)


def run(args) -> int:
    import numpy as np

    from kiln.vit import ViTClient

    results = ViTClient(args.url, args.protocol).embed(read_images(args.images), layer=args.layer,
                                                        tokens=args.tokens == "all")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for index, r in enumerate(results):
            if r.error is None:
                stem = f"{index:03d}-{Path(r.image).stem}"  # the index keeps a/x.jpg and b/x.png apart
                np.save(args.out / f"{stem}.embedding.npy", r.embedding)
                if r.tokens is not None:
                    np.save(args.out / f"{stem}.tokens.layer{r.layer}.npy", r.tokens)
    if args.json:
        print(json.dumps([r.as_dict() for r in results]))
    else:
        for r in results:
            if r.error:
                print(f"{r.image}\n  error: {r.error}")
                continue
            line = (f"{r.image}\n  embedding (768): norm {np.linalg.norm(r.embedding):.4f}  "
                    f"first {np.round(r.embedding[:4], 4).tolist()}")
            if r.tokens is not None:
                line += f"\n  tokens of block {r.layer}: {tuple(r.tokens.shape)}"
            print(line)
    return 1 if any(r.error for r in results) else 0
