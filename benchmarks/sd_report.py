"""`kiln bench sd`'s results: the summary (speedups, the loop's own time, the Triton overhead), its table and
its plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.load import machine, machine_line

BASELINE = "torch-fp32"


def summarize(results: list[dict], triton: dict | None, derived: dict, options) -> dict:
    """The result JSON: every variant's row with its speedup and loop overhead, the best UNet, the Triton overhead."""
    base = next(r for r in results if r["variant"] == BASELINE)
    base_unet = base["components"]["unet"]["median_s"]
    for r in results:
        c = r["components"]
        r["unet_speedup"] = base_unet / c["unet"]["median_s"]
        # One image from the component medians: text encoder + steps x UNet step + VAE decoder.
        r["composed_image_s"] = (c["text_encoder"]["median_s"] + options.steps * c["unet"]["median_s"]
                                 + c["vae_decoder"]["median_s"])
        # What the loop adds around the models: scheduler arithmetic, CFG, tokenizing, postprocessing.
        r["loop_overhead_per_step_s"] = (r["image_s"] - r["composed_image_s"]) / options.steps
    best = max(results, key=lambda r: r["unet_speedup"])
    out = {
        "benchmark": "sd", "pipeline": options.pipeline, "family": options.family, "image_side": options.side,
        "steps": options.steps,
        "options": {k: str(v) for k, v in asdict(options).items()},
        "machine": machine(),
        "variants": results, "derive": derived, "baseline": BASELINE,
        "best_unet": {"variant": best["variant"], "speedup": best["unet_speedup"], "target": 2.5,
                      "met": best["unet_speedup"] >= 2.5},
    }
    if triton is not None:
        direct = next((r for r in results if r["variant"] == triton["variant"]), None)
        if direct is not None:
            triton["overhead"] = triton["image_s"] / direct["image_s"] - 1
            # The same question without the compute: each path's wall time minus the time its models computed
            # (measured inside the same run, so a machine that is slower for a minute does not move it).
            # Triton's compute is its own statistic; its Python-backend models' stub IPC counts as compute.
            outside = (triton["image_s"] - triton["triton_compute_s"]) - (direct["image_s"] - direct["model_calls_s"])
            triton["overhead_outside_compute_s"] = outside
            triton["overhead_outside_compute"] = outside / direct["image_s"]
            out["triton_overhead"] = {"value": triton["overhead"], "target": 0.05, "met": triton["overhead"] <= 0.05,
                                      "outside_compute": triton["overhead_outside_compute"],
                                      "outside_compute_met": triton["overhead_outside_compute"] <= 0.05}
        out["triton"] = triton
    return out


def _executes(precision: dict[str, str]) -> str:
    """What the UNet computes in, and the other components where they differ (a mix: build.sd.mix)."""
    others = [f"{label} {precision[c]}" for c, label in (("text_encoder", "text"), ("vae_decoder", "VAE"))
              if precision.get(c, precision["unet"]) != precision["unet"]]
    return ", ".join([precision["unet"], *others])


def markdown_table(result: dict) -> str:
    side, steps = result["image_side"], result["steps"]
    lines = [f"Pipeline: {result['pipeline']} SD at {side}x{side}, Euler a, CFG 7 (UNet batch 2), {steps} steps. "
             "Latencies are medians after one warm-up call; speedup is the UNet step against torch eager fp32 of "
             "this run. Composed = text encoder + steps x UNet + VAE decoder; measured = the orchestrator's loop "
             "run in-process with these models. Parity against torch fp32: UNet cosine, and the PSNR of the "
             "generated image.", machine_line(result["machine"]), "",
             "| variant | executes in | text encoder ms | UNet step ms | VAE decode ms | UNet x torch | "
             f"{steps}-step image s (composed) | (measured) | loop overhead ms/step | UNet cosine | image PSNR dB "
             "| peak RSS MB | load s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["variants"]:
        c, p = r["components"], r.get("parity", {})
        cosine = f"{p['unet']['cosine']:.6f}" if p else "(reference)"
        image_psnr = p.get("image_psnr_db")
        psnr_text = "" if image_psnr is None else ("identical" if image_psnr == float("inf") else f"{image_psnr:.1f}")
        lines.append(
            f"| {r['variant']} | {_executes(r['executed_precision'])} | {c['text_encoder']['median_s'] * 1000:.0f} | "
            f"{c['unet']['median_s'] * 1000:.0f} | {c['vae_decoder']['median_s'] * 1000:.0f} | "
            f"{r['unet_speedup']:.2f}x | {r['composed_image_s']:.2f} | {r['image_s']:.2f} | "
            f"{r['loop_overhead_per_step_s'] * 1000:.1f} | {cosine} | "
            f"{psnr_text} | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} |")
    triton = result.get("triton")
    if triton is not None:
        overhead = triton.get("overhead")
        lines += ["", f"Through Triton + the orchestrator ({triton['variant']}, the served build): "
                  f"{triton['image_s']:.2f} s per {triton['image_steps']}-step image"
                  + (f", {overhead:+.1%} against the direct loop" if overhead is not None else "")
                  + f"; Triton's process tree peak RSS {triton['peak_rss_mb']:.0f} MB"
                  + (f"; image PSNR against the direct loop {triton['image_psnr_vs_direct_db']:.1f} dB"
                     if triton.get("image_psnr_vs_direct_db", float("inf")) != float("inf") else
                     "; the image is identical to the direct loop's" if "image_psnr_vs_direct_db" in triton else "")
                  + "."]
        if "overhead_outside_compute_s" in triton:
            direct = next(r for r in result["variants"] if r["variant"] == triton["variant"])
            steps_ = triton["image_steps"]
            lines += ["", "Where the time goes, per image (each path measured within its own run, so the machine's "
                      "speed that minute cancels out):", "",
                      "| path | image s | models computing s | model calls as the loop sees them s | "
                      "queued in Triton s | loop and transport s | per step ms |",
                      "|---|---:|---:|---:|---:|---:|---:|",
                      f"| direct (in-process) | {direct['image_s']:.2f} | {direct['model_calls_s']:.2f} | "
                      f"{direct['model_calls_s']:.2f} | - | {direct['image_s'] - direct['model_calls_s']:.3f} | "
                      f"{(direct['image_s'] - direct['model_calls_s']) / steps_ * 1000:.1f} |",
                      f"| Triton + orchestrator | {triton['image_s']:.2f} | {triton['triton_compute_s']:.2f} | "
                      f"{triton['model_calls_s']:.2f} | {triton['triton_queue_s']:.3f} | "
                      f"{triton['image_s'] - triton['triton_compute_s']:.3f} | "
                      f"{(triton['image_s'] - triton['triton_compute_s']) / steps_ * 1000:.1f} |",
                      "", f"Triton + the orchestrator add {triton['overhead_outside_compute_s']:+.3f} s outside the "
                      f"models' compute: {triton['overhead_outside_compute']:+.2%} of the direct image "
                      f"(target 5%: {'met' if triton['overhead_outside_compute'] <= 0.05 else 'not met'}). The whole "
                      f"images differ by {triton['overhead']:+.1%}, which includes the models' own run-to-run speed."]
    for variant, error in result.get("failed", {}).items():
        lines += ["", f"{variant} failed: {error.splitlines()[0]}"]
    best = result["best_unet"]
    lines += ["", f"Best UNet step: {best['variant']} at {best['speedup']:.2f}x torch eager fp32 "
              f"(target {best['target']}x: {'met' if best['met'] else 'not met'})."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    names = [r["variant"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    y = np.arange(len(rows))
    seconds = max(r["components"]["unet"]["median_s"] for r in rows) > 2  # full size: seconds; tiny: ms
    scale, unit = (1, "s") if seconds else (1000, "ms")
    left.barh(y, [r["components"]["unet"]["median_s"] * scale for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        left.text(r["components"]["unet"]["median_s"] * scale, i, f" {r['unet_speedup']:.2f}x", va="center")
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel(f"{unit} per UNet step (batch 2)")
    left.set_title(f"UNet step, {result['pipeline']} SD {result['image_side']}px")
    parts = (("text_encoder", "text encoder", "tab:green"), ("unet", f"{result['steps']} UNet steps", "tab:blue"),
             ("vae_decoder", "VAE decode", "tab:orange"))
    bars = [(r["variant"], r) for r in rows]
    if result.get("triton"):
        bars.append(("triton (onnxruntime-fp32)", None))
    y2 = np.arange(len(bars))
    left_edge = np.zeros(len(bars))
    for key, label, color in parts:
        widths = np.array([(r["components"][key]["median_s"] * (result["steps"] if key == "unet" else 1)) if r else 0.0
                           for _, r in bars])
        right.barh(y2, widths, left=left_edge, color=color, label=label)
        left_edge += widths
    measured = [r["image_s"] if r else result["triton"]["image_s"] for _, r in bars]
    right.scatter(measured, y2, color="black", marker="|", s=300, label="measured image", zorder=3)
    right.set_yticks(y2, [name for name, _ in bars])
    right.invert_yaxis()
    right.set_xlabel(f"seconds per {result['steps']}-step image")
    right.set_title("one image: components and the measured loop")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.45, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
