"""What kiln's text encoder graph costs against the plain CLIP export: SD 1.5's CLIP-L (seeded random weights), the
plain `CLIPTextModel` (input_ids only) vs kiln's (per-row clip skip, textual-inversion vectors; build/sd/export.py),
both exported to ONNX and run on ONNX Runtime fp32, CPU, at batch 2 x 77 (a prompt and its negative).

    python -m benchmarks.text_encoder [--runs 15]

Prints a table, writes benchmarks/results/text-encoder.json; the ratio is against the plain export measured in the
same run, and the two outputs are compared (no embedding, clip skip 1: they must agree).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import types
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "text-encoder.json"


def main(argv: list[str] | None = None) -> dict:
    import onnxruntime as ort
    import torch
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.load import machine, machine_line
    from build.sd.export import export_modules

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
    model = CLIPTextModel(config).eval()

    class Plain(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, input_ids):
            out = self.clip(input_ids, return_dict=False)
            return out[0], out[1]

    vae = types.SimpleNamespace(config=types.SimpleNamespace(scaling_factor=0.18215))  # export_modules wraps it too
    kiln_module = export_modules(types.SimpleNamespace(text_encoder=model, unet=None, vae=vae,
                                                       controlnets={}))["text_encoder"]
    ids = torch.randint(0, config.vocab_size - 1, (2, 77))
    extra = {"clip_skip": np.ones(2, dtype=np.int64), "token_vectors": np.zeros((1, 768), dtype=np.float32)}
    sessions = {}
    with tempfile.TemporaryDirectory() as scratch, torch.inference_mode():
        for name, module, inputs in (("plain CLIPTextModel", Plain(model), ("input_ids",)),
                                     ("kiln (clip skip + vectors)", kiln_module,
                                      ("input_ids", "clip_skip", "token_vectors"))):
            path = Path(scratch) / f"{len(sessions)}.onnx"
            feeds = {"input_ids": ids.numpy()} | {k: v for k, v in extra.items() if k in inputs}
            torch.onnx.export(module, tuple(torch.from_numpy(feeds[n]) for n in inputs), str(path),
                              input_names=list(inputs), output_names=["last_hidden_state", "pooler_output"],
                              dynamic_axes={n: {0: n} for n in inputs}, opset_version=17, dynamo=False)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            sessions[name] = (session, feeds, session.run(None, feeds)[0])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for run in tqdm(range(args.runs + 3), desc="text encoder", unit="round"):  # interleaved: drift hits both alike
        for name, (session, feeds, _) in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            if run >= 3:
                times[name].append(time.perf_counter() - start)
    rows = {name: {"median_ms": round(float(np.median(times[name])) * 1000, 2), "output": sessions[name][2]}
            for name in sessions}
    baseline, ours = rows.values()
    result = {"machine": machine(), "runs": args.runs, "batch": [2, 77],
              "rows": {k: {"median_ms": v["median_ms"]} for k, v in rows.items()},
              "ratio": round(ours["median_ms"] / baseline["median_ms"], 3),
              "max_abs_diff": float(np.abs(baseline["output"] - ours["output"]).max())}
    print(machine_line(result["machine"]))
    print("| text encoder (ONNX Runtime fp32, batch 2 x 77) | median ms |\n|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['median_ms']:.1f} |")
    print(f"ratio kiln / plain: {result['ratio']:.2f}; max |diff| of last_hidden_state: {result['max_abs_diff']:.2e}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
