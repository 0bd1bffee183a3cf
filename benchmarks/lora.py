"""What a LoRA costs on the compiled models: the switch to a set not yet held (read, merge, open a session), a held
set, the step time of a LoRA session against the base session, and the memory a held set keeps.

An SD build of seeded random weights (`--size tiny`, seconds; `--size full`, SD 1.5's architecture: minutes and
about 12 GB of memory) served as ONNX Runtime fp32, and a kohya-layout LoRA for it (`kiln weights lora`'s, rank
`--rank`). Times are medians; the step times are interleaved (base, LoRA, base, ...) and compared as a ratio. A
LoRA session stops at ONNX Runtime's extended optimizations (kiln.runtime.Session); for a file with external
data (the full-size UNet) the same set is also opened with KILN_LORA_ORT_LEVEL=all (every optimization, its
weights replaced as the file loads) and measured in the same rounds.

    python -m benchmarks.lora [--size tiny|full] [--rank 16] [--runs 7]

Prints a table, writes benchmarks/results/lora-<size>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd.families import ARCHITECTURES
    from build.sd.lora import random_lora, write_lora
    from build.sd.weights import write_sd_checkpoint
    from kiln.lora import LoraLibrary, LoraUse
    from kiln.machine import machine
    from kiln.runtime import Session, SessionOptions
    from kiln.runtime.lora import LoraSessions, external_initializers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    side = 64 if args.size == "tiny" else 256  # pixels: 8x8 and 32x32 latents
    arch = ARCHITECTURES[args.size]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="kiln-lora-bench-") as scratch:
        scratch = Path(scratch)
        print(f"building the {args.size} SD (ONNX Runtime fp32) ...", flush=True)
        write_sd_checkpoint(scratch / "weights", size=args.size, controlnet=False)
        build_sd(SDBuildOptions(weights=str(scratch / "weights"), repository=scratch / "repo", progress=False,
                                images=ImageRange(side // 2, side, side)), log=lambda _m: None)
        write_lora(scratch / "loras" / "bench.safetensors", random_lora(args.size, rank=args.rank, alpha=args.rank / 2))
        spec = LoraLibrary(scratch / "loras").resolve([LoraUse("bench", 0.8, 0.8)])
        rng = np.random.default_rng(0)
        hidden = arch.text_encoder["hidden_size"]
        feeds = {
            "text_encoder": {"input_ids": rng.integers(0, 49407, (2, 77)).astype(np.int64),
                             "clip_skip": np.ones(2, np.int64), "token_vectors": np.zeros((1, hidden), np.float32)},
            "unet": {"sample": rng.standard_normal((2, 4, side // 8, side // 8), dtype=np.float32),
                     "timestep": np.full(2, 500.0, np.float32),
                     "encoder_hidden_states": rng.standard_normal((2, 77, arch.unet["cross_attention_dim"]),
                                                                  dtype=np.float32)}}
        for component, feed in feeds.items():
            path = scratch / "repo" / f"sd_{component}" / "1" / "model.onnx"
            before = _rss_mb()
            started = time.perf_counter()
            base = Session(SessionOptions("onnxruntime", path))
            base_open = time.perf_counter() - started
            base_mb = _rss_mb() - before
            held = LoraSessions(base, scratch / "loras")
            before = _rss_mb()
            started = time.perf_counter()
            with _lora_level("extended"):  # the default, whatever this shell sets
                lora = held.session(spec.spec(component))
            switch = time.perf_counter() - started
            lora_mb = _rss_mb() - before
            started = time.perf_counter()
            assert held.session(spec.spec(component)) is lora
            again = time.perf_counter() - started
            arms = {"base": base, "lora": lora}
            full = {}
            if external_initializers(path):  # the same set at every optimization level (KILN_LORA_ORT_LEVEL=all)
                before, started = _rss_mb(), time.perf_counter()
                with _lora_level("all"):
                    arms["lora_all"] = LoraSessions(base, scratch / "loras").session(spec.spec(component))
                full = {"switch_s": round(time.perf_counter() - started, 3),
                        "session_rss_mb": round(_rss_mb() - before)}
            times: dict[str, list[float]] = {name: [] for name in arms}
            for session in arms.values():
                session.run(feed)  # warm
            for _ in tqdm(range(args.runs), desc=f"{component} {'/'.join(arms)}", unit="round"):
                for name, session in arms.items():
                    started = time.perf_counter()
                    session.run(feed)
                    times[name].append(time.perf_counter() - started)
            base_ms, lora_ms = (statistics.median(times[k]) * 1e3 for k in ("base", "lora"))
            if full:
                full["lora_ms"] = round(statistics.median(times["lora_all"]) * 1e3, 2)
                full["ratio"] = round(full["lora_ms"] / base_ms, 3)
            rows[component] = {
                "layers": len([m for m in held._layers(scratch / "loras" / "bench.safetensors")]),
                "base_open_s": round(base_open, 3), "switch_s": round(switch, 3), "held_s": round(again, 6),
                "merged_mb": round(held.held_bytes / 2**20, 1), "base_session_rss_mb": round(base_mb),
                "lora_session_rss_mb": round(lora_mb), "base_ms": round(base_ms, 2), "lora_ms": round(lora_ms, 2),
                "ratio": round(lora_ms / base_ms, 3), **({"all_levels": full} if full else {})}
    header = (f"{'component':13s} {'layers':>6s} {'switch s':>9s} {'held s':>8s} {'merged MB':>9s} "
              f"{'session MB':>10s} {'base ms':>8s} {'LoRA ms':>8s} {'ratio':>6s}")
    print(header)
    for component, row in rows.items():
        print(f"{component:13s} {row['layers']:6d} {row['switch_s']:9.3f} {row['held_s']:8.6f} {row['merged_mb']:9.1f} "
              f"{row['lora_session_rss_mb']:10d} {row['base_ms']:8.2f} {row['lora_ms']:8.2f} {row['ratio']:6.3f}")
    result = {"size": args.size, "rank": args.rank, "batch": 2, "image_side": side, "runs": args.runs,
              "machine": machine(), "components": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"lora-{args.size}.json"
    out.write_text(json.dumps(result, indent=1))
    for component, row in rows.items():
        if "all_levels" in row:
            other = row["all_levels"]
            print(f"{component}: the same set with KILN_LORA_ORT_LEVEL=all (every optimization): switch "
                  f"{other['switch_s']:.3f} s, session {other['session_rss_mb']} MB, {other['lora_ms']:.2f} ms, "
                  f"ratio {other['ratio']:.3f}")
    print(f"machine: {result['machine']}\nwrote {out}")
    return result


@contextlib.contextmanager
def _lora_level(level: str):
    """KILN_LORA_ORT_LEVEL set to `level` for the sessions opened inside, the caller's setting restored after."""
    from kiln.runtime.lora import LORA_LEVEL_ENV

    saved = os.environ.get(LORA_LEVEL_ENV)
    os.environ[LORA_LEVEL_ENV] = level
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(LORA_LEVEL_ENV, None)
        else:
            os.environ[LORA_LEVEL_ENV] = saved


if __name__ == "__main__":
    main()
