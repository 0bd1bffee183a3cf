"""The peer of `kiln bench edge`: OpenVINO GenAI's Text2ImagePipeline (C++ behind Python bindings, no torch when it
runs) on the benchmark's checkpoint, converted to the folder layout it reads (optimum-intel's export layout: one
`openvino_model.xml` per component with its config, the tokenizer converted by openvino-tokenizers, the scheduler's
config).

optimum-intel's exporter would make that folder, but no release installs beside this project's transformers 5:
optimum-intel 2.2.0 (the newest) needs transformers<5.6 and huggingface-hub<1.22, 2.0-2.1 need safetensors<0.8, older
ones transformers<4.58; forced in with --no-deps it fails to import (transformers 5 moved what its quantization module
imports). So the same layout is made here with OpenVINO's own convert_model on diffusers' modules, and the same NNCF
weight compression as kiln's variants for the lower precisions: both sides run the same kind of artifact.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

# kiln's variant -> (GenAI's INFERENCE_PRECISION_HINT, the NNCF compression of the text encoder and the UNet)
PRECISIONS = {"fp32": ("f32", None), "bf16": ("bf16", None), "int8": ("f32", "int8"), "int4": ("f32", "int4")}


def _compress(model, kind: str | None):
    """kiln's own weight compression (build.convert.compress_weights), so both sides run the same artifact."""
    from build.convert import compress_weights

    return model if kind is None else compress_weights(model, kind)


def convert(checkpoint: Path, out: Path, precision: str, scheduler_config: dict) -> float:
    """checkpoint (a diffusers SD 1.x folder) -> out, in GenAI's layout at `precision`; returns seconds."""
    import openvino as ov
    import torch
    from diffusers import StableDiffusionPipeline
    from openvino_tokenizers import convert_tokenizer
    from transformers import CLIPTokenizer

    start = time.perf_counter()
    compression = PRECISIONS[precision][1]
    pipe = StableDiffusionPipeline.from_pretrained(str(checkpoint), safety_checker=None, requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)

    def save(model, folder: str, config) -> None:
        (out / folder).mkdir(exist_ok=True)
        ov.save_model(model, str(out / folder / "openvino_model.xml"), compress_to_fp16=False)
        (out / folder / "config.json").write_text(json.dumps(dict(config), indent=2, default=str))

    def named(model, names: list[str]):
        for output, name in zip(model.outputs, names, strict=True):
            output.get_tensor().set_names({name})
        return model

    class TextEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            hidden, pooled = self.model(input_ids, return_dict=False)[:2]
            return hidden, pooled

    class UNet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class Decoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, latent_sample):
            return self.model.decode(latent_sample, return_dict=False)[0]

    text, unet, vae = pipe.text_encoder.eval(), pipe.unet.eval(), pipe.vae.eval()
    tokens, width = text.config.max_position_embeddings, unet.config.cross_attention_dim
    latents = unet.config.in_channels
    with torch.no_grad():
        ids = torch.ones(1, tokens, dtype=torch.int64)
        model = ov.convert_model(TextEncoder(text), example_input={"input_ids": ids},
                                 input=[("input_ids", ov.PartialShape([-1, -1]), ov.Type.i64)])
        save(_compress(named(model, ["last_hidden_state", "pooler_output"]), compression), "text_encoder",
             text.config.to_dict())
        model = ov.convert_model(UNet(unet), example_input={
            "sample": torch.randn(2, latents, 8, 8), "timestep": torch.tensor([1], dtype=torch.int64),
            "encoder_hidden_states": torch.randn(2, tokens, width)}, input=[
            ("sample", ov.PartialShape([-1, latents, -1, -1]), ov.Type.f32),
            ("timestep", ov.PartialShape([-1]), ov.Type.i64),
            ("encoder_hidden_states", ov.PartialShape([-1, -1, width]), ov.Type.f32)])
        save(_compress(named(model, ["out_sample"]), compression), "unet", unet.config)
        channels = vae.config.latent_channels
        model = ov.convert_model(Decoder(vae), example_input={"latent_sample": torch.randn(1, channels, 8, 8)},
                                 input=[("latent_sample", ov.PartialShape([-1, channels, -1, -1]), ov.Type.f32)])
        save(_compress(named(model, ["sample"]), compression), "vae_decoder", vae.config)
    tokenizer = CLIPTokenizer.from_pretrained(str(checkpoint / "tokenizer"))
    encoder, decoder = convert_tokenizer(tokenizer, with_detokenizer=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    ov.save_model(encoder, str(out / "tokenizer" / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(out / "tokenizer" / "openvino_detokenizer.xml"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2, default=str))
    shutil.copy(checkpoint / "model_index.json", out / "model_index.json")
    return time.perf_counter() - start


def generate(folder: Path, precision: str, request: dict, cache: Path | None = None, image: bool = True) -> dict:
    """One image through GenAI in this process: the pipeline's construction (reading and compiling the models, with
    OpenVINO's model cache in `cache`), a one-step warm-up at the image's size, then the timed image (with `image`
    false: the construction alone). `request`: prompt, negative_prompt, width, height, steps, cfg_scale, seed."""
    import numpy as np
    import openvino_genai as genai

    hint = PRECISIONS[precision][0]
    properties = {"INFERENCE_PRECISION_HINT": hint} | ({"CACHE_DIR": str(cache)} if cache else {})
    start = time.perf_counter()
    pipe = genai.Text2ImagePipeline(str(folder), "CPU", **properties)
    pipe.set_scheduler(genai.Scheduler.from_config(str(folder / "scheduler" / "scheduler_config.json"),
                                                   genai.Scheduler.Type.EULER_DISCRETE))
    ready = time.perf_counter() - start

    if not image:
        return {"ready_s": ready}

    def run(steps: int) -> np.ndarray:
        out = pipe.generate(request["prompt"], negative_prompt=request["negative_prompt"], width=request["width"],
                            height=request["height"], num_inference_steps=steps, guidance_scale=request["cfg_scale"],
                            generator=genai.TorchGenerator(request["seed"]))
        return np.array(out.data, copy=True)[0]  # GenAI reuses its output buffer for the next call

    run(1)
    start = time.perf_counter()
    pixels = run(request["steps"])
    return {"ready_s": ready, "image_s": time.perf_counter() - start, "image": pixels}
