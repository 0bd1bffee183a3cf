"""Live previews without a VAE call: AUTOMATIC1111's "Approx cheap" linear map from SD 1.x's latents to RGB."""

from __future__ import annotations

import base64

import numpy as np

from kiln.imaging import PNG, ImageFormat

PREVIEW_COEFFICIENTS = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                                 [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], dtype=np.float32)


def preview_png(latents: np.ndarray, encoding: ImageFormat = PNG) -> str:
    """A cheap preview of the first image's latents as base64 PNG, or as `encoding` asks (/sdapi/v1/progress: the
    server's samples_format, as AUTOMATIC1111's current_image); other channel counts: their mean, grey."""
    sample = np.asarray(latents[0], dtype=np.float32)
    if sample.shape[0] == len(PREVIEW_COEFFICIENTS):
        rgb = np.einsum("chw,cr->hwr", sample, PREVIEW_COEFFICIENTS)
    else:
        rgb = np.repeat(sample.mean(axis=0)[..., None], 3, axis=2)
    pixels = np.clip((rgb + 1) * 127.5, 0, 255).astype(np.uint8)
    return base64.b64encode(encoding.encode(pixels)).decode()
