"""Generated images as PNG files carrying AUTOMATIC1111's "parameters" text chunk."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def parameters_text(info: dict) -> str:
    """AUTOMATIC1111's infotext: prompt, 'Negative prompt: ...', then 'Steps: 20, Sampler: ..., ...'."""
    lines = [info.get("prompt", "")]
    if info.get("negative_prompt"):
        lines.append(f"Negative prompt: {info['negative_prompt']}")
    fields = [("Steps", info.get("steps")), ("Sampler", info.get("sampler")), ("CFG scale", info.get("cfg_scale")),
              ("Seed", info.get("seed")), ("Size", f"{info.get('width')}x{info.get('height')}"),
              ("Model hash", info.get("model_hash")), ("Model", info.get("model")),
              ("Variation seed", info.get("subseed")), ("Variation seed strength", info.get("subseed_strength")),
              ("Denoising strength", info.get("denoising_strength")),
              ("Mask blur", info.get("mask_blur")),
              ("Mask mode", None if "inpainting_mask_invert" not in info
               else ("Inpaint not masked" if info["inpainting_mask_invert"] else "Inpaint masked")),
              ("ControlNet 0", info.get("controlnet"))]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def png_bytes(image: np.ndarray, info: dict) -> bytes:
    """The image as PNG bytes carrying the "parameters" chunk."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", parameters_text(info))
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


def save_png(image: np.ndarray, path: Path, info: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, info))
    return path
