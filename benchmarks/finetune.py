"""What `kiln finetune vit` costs and what it changes in serving.

1. Training images/s (forward, backward and AdamW step of kiln's recipe, inputs already in memory) for ViT-Tiny and
   ViT-B/16 in fp32 and in bf16 autocast, on this CPU (or a GPU with --device cuda: fp32 and fp16); the ratio is
   against fp32 measured in the same run.
2. Served throughput of a fine-tuned ViT-B/16 (a 3-class head) against the stock one (1000 classes): both exported
   as `kiln build vit` exports them and run on ONNX Runtime fp32 at batch 8, interleaved; only the head differs.

    python -m benchmarks.finetune [--steps 4] [--runs 8] [--device cpu|cuda]

Prints a table with the machine's ISA, writes benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.load import machine, machine_line

RESULTS = Path(__file__).resolve().parent / "results" / "finetune.json"
MODELS = {"ViT-Tiny": ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", 16),
          "ViT-B/16": ("vit_base_patch16_224.augreg2_in21k_ft_in1k", 8)}  # name, batch


def train_throughput(model_name: str, precision: str, device: str = "cpu", batch: int = 8, steps: int = 4,
                     classes: int = 3) -> dict:
    """Images/s of training steps as kiln finetune takes them (AdamW with layer decay, autocast), after 2 warm-up."""
    import timm
    import timm.optim
    import torch

    from build.vit.finetune import _autocast

    torch.manual_seed(0)
    target = torch.device(device)
    model = timm.create_model(model_name, pretrained=False, num_classes=classes).to(target).train()
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, layer_decay=0.75)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    images = torch.randn(batch, 3, *model.patch_embed.img_size, device=target)
    labels = torch.randint(0, classes, (batch,), device=target)
    times = []
    for step in range(steps + 2):
        if target.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with _autocast(target, precision):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if target.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"batch": batch, "steps": steps, "step_s": round(seconds, 4), "images_per_s": round(batch / seconds, 2)}


def served_throughput(runs: int, batch: int = 8) -> dict:
    """The stock ViT-B/16 head against a fine-tuned 3-class one, exported alike, ONNX Runtime fp32, interleaved."""
    import timm
    import torch

    from build.convert import VIT_VARIANTS, open_session
    from build.vit.export import export_onnx
    from build.vit.spec import spec_for

    pixels = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    feeds = {"pixel_values": pixels, "layer": np.full((batch, 1), 11, dtype=np.int64)}
    sessions = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, classes in (("stock (1000 classes)", 1000), ("fine-tuned (3 classes)", 3)):
            torch.manual_seed(0)
            model = timm.create_model(MODELS["ViT-B/16"][0], pretrained=False, num_classes=classes).eval()
            path = Path(scratch) / f"{classes}.onnx"
            export_onnx(model, path, spec_for(model))
            sessions[name] = open_session(VIT_VARIANTS["onnxruntime-fp32"], path)
        times = {name: [] for name in sessions}
        for run in range(runs + 2):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(feeds, ["logits"])
                if run >= 2:
                    times[name].append(time.perf_counter() - start)
    rows = {name: round(batch / float(np.median(t)), 2) for name, t in times.items()}
    stock, tuned = rows.values()
    return {"batch": batch, "runs": runs, "images_per_s": rows, "ratio_fine_tuned_over_stock": round(tuned / stock, 3)}


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    low = "fp16" if args.device == "cuda" else "bf16"
    result = {"machine": machine(), "device": args.device, "training": {}}
    cases = [(label, precision) for label in MODELS for precision in ("fp32", low)]
    for label, precision in tqdm(cases, desc="training throughput", unit="case"):
        name, batch = MODELS[label]
        result["training"].setdefault(label, {})[precision] = train_throughput(name, precision, args.device, batch,
                                                                               args.steps)
    for rows in result["training"].values():
        rows[f"{low}_over_fp32"] = round(rows[low]["images_per_s"] / rows["fp32"]["images_per_s"], 3)
    result["served"] = served_throughput(args.runs)
    print(f"{machine_line(result['machine'])} Device: {args.device}.")
    print(f"| training | batch | fp32 images/s | {low} images/s | {low} / fp32 |\n|---|---|---|---|---|")
    for label, rows in result["training"].items():
        print(f"| {label} | {rows['fp32']['batch']} | {rows['fp32']['images_per_s']:.2f} | "
              f"{rows[low]['images_per_s']:.2f} | {rows[f'{low}_over_fp32']:.2f} |")
    served = result["served"]
    print(f"| served ViT-B/16, ONNX Runtime fp32, batch {served['batch']} | images/s |\n|---|---|")
    for name, value in served["images_per_s"].items():
        print(f"| {name} | {value:.2f} |")
    print(f"ratio fine-tuned / stock: {served['ratio_fine_tuned_over_stock']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
