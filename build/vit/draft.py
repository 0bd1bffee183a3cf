"""What `--jpeg-draft` and `--decode torch` change, measured at build time: the parity images decoded reduced, or by
torchvision, against PIL's decode in full.

A JPEG at least twice the resize target decodes at 1/2, 1/4 or 1/8 scale (kiln.imaging.decode_image's `draft`)
before the same resize: the pixels the ViT sees move a little, and so do its logits. torchvision's decode (nvJPEG on
a GPU) and torch's antialiased resize move them a little too (kiln.runtime.torch_decode). The build report records
both, against PyTorch on the exact pixels, so that the trade is shown where the choice is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from build import parity
from kiln.errors import ConfigError
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


def decode_figures(model, images: list[Path], transform: EvalTransform, layers: np.ndarray,
                   reference: dict[str, np.ndarray], device: str) -> dict:
    """The report's `decode` entry for --decode torch: the parity images through kiln.runtime.torch_decode on the
    build's device (the GPU a GPU build serves from) against PIL's pixels (how many torchvision decoded itself, the
    largest pixel difference in levels, the worst image's PSNR), and PyTorch's logits on them against its logits on
    PIL's pixels."""
    from build.vit.export import reference_outputs
    from kiln.runtime.torch_decode import TorchDecoder

    decoder = TorchDecoder(transform, device="cuda:0" if device == "gpu" else "cpu")
    payloads = [p.read_bytes() for p in images]
    decoded = decoder(payloads)
    failed = [p.name for p, d in zip(images, decoded) if isinstance(d, str)]
    if failed:
        raise ConfigError(f"--decode torch could not decode the parity images {', '.join(failed)}")
    ours = np.stack([d.cpu().numpy() for d in decoded])
    pil = np.stack([preprocess(data, transform, scaled=False) for data in payloads])
    worst = min(parity.psnr(p.astype(np.float32) / 255, o.astype(np.float32) / 255, peak=1.0)
                for p, o in zip(pil, ours))
    outputs = reference_outputs(model, transform.normalize(ours), layers)
    figures = parity.compare(reference["logits"], outputs["logits"], classify=True)
    return {"decode": "torch", "device": str(decoder.device), "parity_images": len(images),
            "decoded_by_torch": sum(decoder.decodes(data) for data in payloads),
            "pixels_max_abs_levels": int(np.abs(pil.astype(int) - ours.astype(int)).max()),
            "pixels_psnr_db": round(worst, 2) if np.isfinite(worst) else None,  # None: identical (strict JSON)
            "logits_vs_pil_pixels": figures.as_dict()}


def decode_summary(entry: dict) -> str:
    """The build's line for `decode_figures`'s entry."""
    psnr, logits = entry["pixels_psnr_db"], entry["logits_vs_pil_pixels"]
    return (f"{entry['decoded_by_torch']} of {entry['parity_images']} parity images decoded by torchvision on "
            f"{entry['device']}: pixels within {entry['pixels_max_abs_levels']} levels of PIL's, PSNR "
            f"{f'{psnr} dB' if psnr else 'inf (identical)'}, PyTorch's logits cosine {logits['cosine']:.6f}, top-1 "
            f"{logits['top1']:.2f} against PIL's pixels")
