"""The matched noise AUTOMATIC1111's "Outpainting mk2" script paints the new border with before it inpaints it (its
get_matched_noise, from g-diffuser): noise whose spectrum is shaped by the known image's, then given the known
pixels' colour histograms, so the border starts with the image's texture and colours instead of black.

As there, step by step (images are (H, W, 3) floats in [0, 1], the mask 1 where the border is):
- the known image, the border blanked and the whole scaled to its maximum, the border then filled with the image's
  mean; its centred, orthonormal 2-D spectrum per channel gives a magnitude and a phase;
- uniform noise from numpy's PCG64 with seed 0 (fixed there, so the noise follows only the request's seed through
  the inpainting), blended towards its grey by `color_variation`, low-passed by the window 1 / ((x^2 + 1)(y^2 + 1));
- the noise's spectrum magnitude squared times the image's magnitude to the power `noise_q` (lower: more detail),
  with the image's phase; back to pixels, scaled to [0, 1];
- the border's values matched to the known pixels' histograms per channel (kiln.color_correction.match_histograms,
  scikit-image 0.21's float path); the known pixels kept exactly.

Guards where AUTOMATIC1111 divides by zero or fails: a known part that is all black is left unscaled (NaN there,
which its uint8 cast makes 0, as here); a spectrum coefficient of exactly zero gets phase 1; a flat shaped noise is
left unscaled; with no known pixel (a border that covers everything) the histograms are not matched (it raises).
"""

from __future__ import annotations

import numpy as np

from kiln.color_correction import match_histograms

__all__ = ["matched_noise"]


def _spectrum(data: np.ndarray) -> np.ndarray:
    """The centred, orthonormal 2-D FFT of each channel (the origin shifted to the middle before and after)."""
    axes = (0, 1)
    return np.fft.ifftshift(np.fft.fft2(np.fft.fftshift(data, axes=axes), axes=axes, norm="ortho"), axes=axes)


def _pixels(spectrum: np.ndarray) -> np.ndarray:
    """_spectrum's inverse, shifted the same way (as there), real part."""
    axes = (0, 1)
    return np.real(np.fft.ifftshift(np.fft.ifft2(np.fft.fftshift(spectrum, axes=axes), axes=axes, norm="ortho"),
                                    axes=axes))


def _window(height: int, width: int) -> np.ndarray:
    """The low-pass window (H, W): 1 / ((x^2 + 1)(y^2 + 1)), x and y from -1 along the shorter side, scaled by the
    aspect ratio along the longer."""
    short = min(height, width)
    rows = (np.arange(height) / height * 2.0 - 1.0) * (height / short)
    cols = (np.arange(width) / width * 2.0 - 1.0) * (width / short)
    return 1.0 / ((rows[:, None] ** 2 + 1.0) * (cols[None, :] ** 2 + 1.0))


def matched_noise(image: np.ndarray, mask: np.ndarray, noise_q: float = 1.0,
                  color_variation: float = 0.05) -> np.ndarray:
    """`image` (H, W, 3) in [0, 1] with its border (`mask`, (H, W, 3) or (H, W), 1 on the border) filled with
    matched noise; float64 in [0, 1]."""
    image = np.asarray(image, np.float64)
    height, width, channels = image.shape
    grey_mask = np.asarray(mask, np.float64)
    grey_mask = grey_mask.mean(axis=2) if grey_mask.ndim == 3 else grey_mask
    border, known = grey_mask > 1e-6, grey_mask < 1e-3
    weight = grey_mask[..., None]

    windowed = image * (1.0 - weight)
    peak = windowed.max()
    windowed = (windowed / peak if peak > 0 else windowed) + image.mean() * weight
    source = _spectrum(windowed)
    magnitude = np.abs(source)
    phase = source / np.where(magnitude == 0, 1.0, magnitude)

    noise = np.random.default_rng(0).random((height, width, channels))
    noise = noise * color_variation + (1.0 - color_variation) * noise.mean(axis=2, keepdims=True)
    noise = _pixels(_spectrum(noise) * _window(height, width)[..., None])
    shaped = _pixels(np.abs(_spectrum(noise)) ** 2 * magnitude ** noise_q * phase)
    shaped -= shaped.min()
    top = shaped.max()
    shaped = shaped / top if top > 0 else shaped
    if border.any() and known.any():
        shaped[border] = match_histograms(shaped[border], image[known])
    return np.clip(image * (1.0 - weight) + shaped * weight, 0.0, 1.0)
