"""Generated images: the decoder's output as uint8 pixels, and PNG files carrying AUTOMATIC1111's "parameters" chunk."""

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
              ("Masked content", None if "inpainting_fill" not in info
               else ("fill", "original", "latent noise", "latent nothing")[info["inpainting_fill"]]),
              ("Inpaint area", "Only masked" if info.get("inpaint_full_res") else None),
              ("Only masked padding, pixels", info.get("inpaint_full_res_padding")),
              ]
    units = info.get("controlnet") or []
    fields += [(f"ControlNet {i}", unit) for i, unit in enumerate([units] if isinstance(units, str) else units)]
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


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE decoder output in [-1, 1] (N, 3, H, W) -> (N, H, W, 3) uint8, rounded as diffusers rounds it."""
    scaled = np.clip(decoded / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
    return np.round(scaled * np.float32(255)).astype(np.uint8)
