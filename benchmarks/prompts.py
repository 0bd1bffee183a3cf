"""What AUTOMATIC1111's prompt features cost per image, against a plain prompt in the same run.

In process (the orchestrator's loop over ONNX Runtime sessions, no transport), one seed, size, sampler and step count;
the arms alternate each round so drift hits all alike:

- `plain`: a prompt and a negative prompt of one 75-token chunk each: one UNet call of 2 rows a step
- `long prompt (default)`: a prompt of two chunks: its rows and the negative prompt's in UNet calls of their own, as
  AUTOMATIC1111 runs them by default
- `long prompt, Pad conds`: the same padded with empty chunks: one call of 2 rows of 154 positions
- `AND, two parts`: composable diffusion: 3 rows a step
- `prompt editing`: `[a cat:a dog:0.5]`: one more text encoded, the same UNet work

    python -m benchmarks.prompts [--size tiny|full] [--repository DIR] [--steps 4] [--rounds 3]

`--size full` builds SD 1.5's architecture (seeded random weights, ONNX Runtime fp32; minutes), `--repository` runs
one already built. Prints a table with the machine's ISA, writes results/prompts-<size>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.load import bar_chart, machine, machine_line, write_results

RESULTS = Path(__file__).resolve().parent / "results"
LONG = "a photo of a cat, " * 15  # 90 tokens: two chunks
ARMS = {"plain": {}, "long prompt (default)": {"prompt": LONG},
        "long prompt, Pad conds": {"prompt": LONG, "pad_conds": "empty_chunks"},
        "AND, two parts": {"prompt": "a photo of a cat AND a dog in the snow"},
        "prompt editing": {"prompt": "a photo of [a cat:a dog:0.5]"}}


def _repository(size: str, side: int, scratch: Path, log) -> Path:
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd.weights import write_sd_checkpoint

    log(f"building the {size} SD (ONNX Runtime fp32) ...")
    write_sd_checkpoint(scratch / "weights", size=size, controlnet=False)
    build_sd(SDBuildOptions(weights=str(scratch / "weights"), repository=scratch / "repo", progress=False,
                            images=ImageRange(side // 2, side, side)), log=lambda _m: None)
    return scratch / "repo"


def run(repository: Path, side: int, steps: int, rounds: int, label: str, log=print) -> dict:
    from tqdm import tqdm

    from orchestrator.pipeline import Pipeline, Txt2ImgRequest

    pipeline = Pipeline.from_repository(repository)
    base = Txt2ImgRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=steps, sampler="Euler",
                          cfg_scale=7.0, seed=1, width=side, height=side)
    calls: dict[str, list[tuple[int, int]]] = {}
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for name, changes in ARMS.items():  # warm-up, and each arm's UNet calls (rows, positions) of one step
        seen: list[tuple[int, int]] = []
        pipeline.txt2img(replace(base, **changes, steps=1), unet_call=lambda graph, inputs, seen=seen: (
            seen.append((len(inputs["sample"]), inputs["encoder_hidden_states"].shape[1])) or graph(inputs)))
        calls[name] = seen
    for _ in tqdm(range(rounds), desc=f"bench prompts ({label})", unit="round"):
        for name, changes in ARMS.items():
            start = time.perf_counter()
            pipeline.txt2img(replace(base, **changes))
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {"machine": machine(), "pipeline": label, "side": side, "steps": steps, "rounds": rounds,
            "arms": {name: {"seconds": seconds[name], "vs_plain": seconds[name] / seconds["plain"],
                            "unet_calls_per_step": [list(call) for call in calls[name]], "runs": times[name]}
                     for name in ARMS}}


def table(result: dict) -> str:
    lines = [f"Prompt features, {result['pipeline']} SD, {result['side']}x{result['side']}, {result['steps']} Euler "
             f"steps, median of {result['rounds']} rounds. {machine_line(result['machine'])}", "",
             "| prompt | s / image | vs plain | UNet calls a step (rows x positions) |", "|---|---:|---:|---|"]
    for name, arm in result["arms"].items():
        shapes = " + ".join(f"{rows} x {positions}" for rows, positions in arm["unet_calls_per_step"])
        lines.append(f"| {name} | {arm['seconds']:.3f} | {arm['vs_plain']:.2f}x | {shapes} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    bar_chart({name: arm["seconds"] for name, arm in result["arms"].items()}, path, "seconds per image",
              f"Prompt features ({result['pipeline']} SD)", ["#888888", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"],
              size=(7, 3))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--repository", type=Path, help="an SD repository already built (--size names it)")
    parser.add_argument("--side", type=int, help="image side in pixels (default: 64 tiny, 256 full)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    side = args.side or (64 if args.size == "tiny" else 256)
    label = args.size
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-prompts-bench-") as scratch:
        repository = args.repository or _repository(args.size, side, Path(scratch), print)
        result = run(repository, side, args.steps, args.rounds, label)
    return write_results(args.out / f"prompts-{label}", result, table, plot)


if __name__ == "__main__":
    main()
