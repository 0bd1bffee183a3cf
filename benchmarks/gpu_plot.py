"""The GPU check's picture: its results.json as three panels (benchmarks/gpu_check.py writes results.png beside it).

- ViT-B/16 images/s by batch: served (tensors, JPEG) against in-process torch, eager and compiled;
- SD 1.5 seconds per image: served, the same variant in process, diffusers, and the target;
- step batching: images/s by concurrent clients, merged steps against none.

    python -m benchmarks.gpu_plot benchmarks/results/gpu-check-h200.json benchmarks/results/gpu-check-h200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = result["phases"]
    figure, (vit, sd, batching) = plt.subplots(1, 3, figsize=(15, 4.2))
    served, local = phases.get("vit_served", {}).get("batches", {}), phases.get("vit_in_process", {}).get("batches", {})
    for label, rows, arm in (("served, float32 tensors", served, "triton_tensor"),
                             ("served, uint8 tensors", served, "triton_uint8"), ("served, JPEG", served, "triton_jpeg"),
                             ("in process, eager", local, "eager"), ("in process, compiled", local, "compiled")):
        points = sorted((int(b), r[arm]["images_per_s"]) for b, r in rows.items() if "images_per_s" in r.get(arm, {}))
        if points:
            vit.plot(*zip(*points), marker="o", label=label)
    target = result["targets"]["vit_images_per_s_at_256"]
    vit.axhline(target, color="grey", linestyle=":", label=f"target {target:,}")
    vit.set(xscale="log", yscale="log", xlabel="batch", ylabel="images/s", title="ViT-B/16")
    vit.legend(fontsize=8)

    bars = {"served": phases.get("sd_served", {}).get("image_s"),
            "in process": phases.get("sd_in_process", {}).get("in_process", {}).get("image_s"),
            "diffusers": phases.get("sd_in_process", {}).get("diffusers", {}).get("image_s")}
    bars = {k: v for k, v in bars.items() if v is not None}
    sd.barh(list(bars), list(bars.values()), color=["#3a7be0", "#8ab0ee", "#8b929c"][:len(bars)])
    sd.axvline(result["targets"]["sd_served_s"], color="grey", linestyle=":", label="target")
    steps, variant = result["options"]["steps"], phases.get("build", {}).get("variant", "")
    sd.set(xlabel="seconds per image", title=f"SD 1.5, {steps} steps, CFG ({variant})")
    sd.legend(fontsize=8)

    rows = phases.get("batching", {}).get("rows", [])
    for arm, label in (("unbatched", "no batching"), ("triton", "Triton's merging only"), ("step", "merged steps")):
        points = sorted((r["clients"], r["images_per_s"]) for r in rows if r["arm"] == arm)
        if points:
            batching.plot(*zip(*points), marker="o", label=label)
    batching.set(xscale="log", xlabel="concurrent clients", ylabel="images/s",
                 title=f"Step batching ({phases.get('batching', {}).get('steps', '')} steps a request)")
    if rows:  # a run without the batching phase leaves the panel empty
        batching.legend(fontsize=8)
    figure.suptitle(f"GPU check: {result['gpu'] or 'CPU'}, torch {result['torch']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args(argv)
    plot(json.loads(args.results.read_text()), args.png)


if __name__ == "__main__":
    main()
