"""What AUTOMATIC1111's Prompts from file and Loopback scripts gain from running their generations side by side: each
script as one request against the same generations sent one after another (as AUTOMATIC1111 runs them), tiny SD
pipeline, over real HTTP to the API service (uvicorn + the embedded Triton, step batching on). Alternating rounds so
drift hits both alike.

    python -m benchmarks.scripts [--rounds 3] [--steps 20] [--lines 6] [--chains 3] [--loops 3]

Prompts from file: `--lines` prompt lines. Loopback: `--chains` chains (n_iter) of `--loops` loops each, against the
same loops one after another, each from the one before. Writes results/scripts-tiny.json, .md, .png.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import httpx

from benchmarks.load import alternate, grouped_bar_chart, machine, machine_line, write_results
from benchmarks.xyz import RESULTS, post, tiny_api

ONE, SEQUENTIAL = "one request (side by side)", "one after another"


def _init_image(side: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def run(rounds: int, steps: int, lines: int, chains: int, loops: int, client: httpx.Client, side: int) -> dict:
    """Both scripts against their generations one by one (client, side: xyz.tiny_api's)."""
    from orchestrator.server.loopback import Loopback

    base = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": steps, "width": side,
            "height": side, "seed": 1}
    prompts = [f"a photo of a cat, variation {k}" for k in range(lines)]
    file_body = base | {"prompt": "", "script_name": "prompts from file or textbox",
                        "script_args": [True, False, "start", "\n".join(prompts)]}

    def lines_one_by_one() -> None:
        for k, prompt in enumerate(prompts):
            post(client, "/sdapi/v1/txt2img", base | {"prompt": prompt, "seed": 1 + k})

    init = _init_image(side)
    loop_body = base | {"init_images": [init], "denoising_strength": 0.75, "n_iter": chains,
                        "script_name": "loopback", "script_args": [loops, 0.5, "Linear", "None"]}
    course = Loopback(loops, 0.75, 0.5, "Linear")

    def loops_one_by_one() -> None:
        for chain in range(chains):
            image = init
            for loop in range(loops):
                answer = post(client, "/sdapi/v1/img2img", base | {
                    "init_images": [image], "seed": 1 + chain * loops + loop,
                    "denoising_strength": course.strength(loop)})
                image = answer["images"][0]

    prompts_s, _ = alternate({ONE: lambda: post(client, "/sdapi/v1/txt2img", file_body),
                              SEQUENTIAL: lines_one_by_one}, rounds, "bench prompts from file")
    loopback_s, _ = alternate({ONE: lambda: post(client, "/sdapi/v1/img2img", loop_body),
                               SEQUENTIAL: loops_one_by_one}, rounds, "bench loopback")
    scripts = {f"Prompts from file, {lines} lines": prompts_s,
               f"Loopback, {chains} chains x {loops} loops": loopback_s}
    return {"machine": machine(), "rounds": rounds, "steps": steps, "side": side, "seconds": scripts,
            "speedup": {name: round(s[SEQUENTIAL] / s[ONE], 2) for name, s in scripts.items()}}


def table(result: dict) -> str:
    lines = [machine_line(result["machine"]), "",
             f"| tiny SD, {result['side']}x{result['side']}, {result['steps']} steps | {ONE} (s) | {SEQUENTIAL} (s) "
             "| speedup |", "|---|---|---|---|"]
    lines += [f"| {name} | {s[ONE]:.2f} | {s[SEQUENTIAL]:.2f} | {result['speedup'][name]:.2f}x |"
              for name, s in result["seconds"].items()]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    names = list(result["seconds"])
    grouped_bar_chart({arm: [result["seconds"][name][arm] for name in names] for arm in (ONE, SEQUENTIAL)}, names,
                      path, "seconds (median)", "AUTOMATIC1111's scripts: their generations side by side")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lines", type=int, default=6)
    parser.add_argument("--chains", type=int, default=3)
    parser.add_argument("--loops", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(".kiln/bench"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    with tiny_api(args.work) as (client, side):
        result = run(args.rounds, args.steps, args.lines, args.chains, args.loops, client, side)
    return write_results(RESULTS / "scripts-tiny", result, table, plot)


if __name__ == "__main__":
    main()
