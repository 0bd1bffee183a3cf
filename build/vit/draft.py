"""What `--jpeg-draft` changes, measured at build time: the parity images decoded reduced against decoded in full.

A JPEG at least twice the resize target decodes at 1/2, 1/4 or 1/8 scale (kiln.imaging.decode_image's `draft`)
before the same resize: the pixels the ViT sees move a little, and so do its logits. The build report records both,
against PyTorch on the exact pixels, so that the trade is shown where the choice is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from build import parity
from kiln.imaging import EvalTransform, decode_image, header_size, preprocess


def draft_figures(model, images: list[Path], transform: EvalTransform, pixels: np.ndarray, layers: np.ndarray,
                  reference: dict[str, np.ndarray]) -> dict:
    """The report's `jpeg_draft` entry: how many parity images decode reduced, their pixels' PSNR (worst image, on
    the 0..1 scale before normalisation) and PyTorch's logits on them against its logits on the exact pixels."""
    from build.vit.export import reference_outputs

    payloads = [p.read_bytes() for p in images]
    reduced = [i for i, data in enumerate(payloads)  # sorted: an EXIF rotation swaps the decoded sides
               if sorted(decode_image(data, draft=transform.resized_size).size) != sorted(header_size(data))]
    entry: dict = {"enabled": True, "parity_images": len(images), "decoded_reduced": len(reduced)}
    if not reduced:
        return entry | {"note": "no parity image is a JPEG of at least twice the resize target, so none decodes "
                                "reduced here; pass --calibration with full-size photos to measure the change"}
    drafted = np.stack([preprocess(payloads[i], transform, jpeg_draft=True) for i in reduced])
    exact = pixels[reduced]
    scale = np.asarray(transform.std, np.float32).reshape(1, 3, 1, 1)  # back to 0..1 before comparing
    worst = min(parity.psnr(e * scale, d * scale, peak=1.0) for e, d in zip(exact, drafted))
    entry["pixels_psnr_db"] = round(worst, 2) if np.isfinite(worst) else None  # None: identical (strict JSON)
    outputs = reference_outputs(model, drafted, layers[reduced])
    figures = parity.compare(reference["logits"][reduced], outputs["logits"], classify=True)
    return entry | {"logits_vs_exact_pixels": figures.as_dict()}


def draft_summary(entry: dict) -> str:
    """The build's line for `draft_figures`'s entry."""
    if not entry["decoded_reduced"]:
        return entry["note"]
    psnr, logits = entry["pixels_psnr_db"], entry["logits_vs_exact_pixels"]
    return (f"{entry['decoded_reduced']} of {entry['parity_images']} parity images decode reduced: pixels PSNR "
            f"{f'{psnr} dB' if psnr else 'inf (identical)'}, PyTorch's logits cosine {logits['cosine']:.6f}, top-1 "
            f"{logits['top1']:.2f} against the exact pixels")
