"""vit_preprocess's decode with torch (`kiln build vit --decode torch`): the JPEGs of a batch decoded together by
torchvision (on a GPU, nvJPEG; on a CPU, libjpeg-turbo), resized with torch's antialiased interpolation and cropped
where they were decoded, so a GPU server's JPEG path leaves the host's cores out of the pixels' way.

What it decodes itself: baseline and progressive JPEGs in RGB or greyscale, stored upright (no EXIF rotation), within
the request limits. Anything else (PNG, WebP, CMYK, a rotated photo, a JPEG torchvision refuses) goes through PIL as
`kiln.imaging.preprocess` takes it, and a bad image fails its own request with the same message. Its pixels are close
to PIL's, not equal: another IDCT and chroma upsampling, and torch's bicubic against PIL's; the build reports the
difference on the parity images (`preprocess.decode`), and PyTorch's logits on them.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image

from kiln.errors import ConfigError
from kiln.imaging import EvalTransform, ImageLimits, preprocess_or_message

MODES = ("bicubic", "bilinear")  # what torch resizes with antialiasing, as PIL's resize does
ORIENTATION = 0x0112  # EXIF's orientation tag: 1 (or none) is upright


class TorchDecoder:
    def __init__(self, transform: EvalTransform, limits: ImageLimits = ImageLimits(), device: str = "cpu") -> None:
        if transform.interpolation not in MODES:
            raise ConfigError(f"--decode torch resizes with {' or '.join(MODES)} only, and this model's eval "
                              f"transform resizes with {transform.interpolation}: build with --decode pil")
        self.transform, self.limits, self.device = transform, limits, torch.device(device)

    def __call__(self, payloads: list[bytes]) -> list[torch.Tensor | str]:
        """Each image's uint8 pixels (3, crop height, crop width) on the device, or the message that fails its
        request (as kiln.imaging.preprocess words it)."""
        results: list[torch.Tensor | str | None] = [None] * len(payloads)
        jpegs = [i for i, data in enumerate(payloads) if self.decodes(data)]
        for i, image in zip(jpegs, self._decode([payloads[i] for i in jpegs])):
            results[i] = self._resize_crop(image) if image is not None else None
        return [result if result is not None else self._through_pil(data) for result, data in zip(results, payloads)]

    @staticmethod
    def stack(pixels: list[torch.Tensor]):
        """One request's images as one batch: on a GPU a DLPack capsule of it there (pb_utils.Tensor.from_dlpack),
        on the CPU numpy."""
        batch = torch.stack(pixels)
        if batch.is_cuda:
            from torch.utils.dlpack import to_dlpack

            torch.cuda.current_stream(batch.device).synchronize()  # its kernels done before Triton reads it
            return to_dlpack(batch)
        return batch.numpy()

    def decodes(self, data: bytes) -> bool:
        """Whether torchvision decodes it as PIL would take it: an upright RGB or greyscale JPEG within the limits
        (the header only; anything else, and every refusal's message, is PIL's path)."""
        if not data or len(data) > self.limits.max_bytes:
            return False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                    upright = image.getexif().get(ORIENTATION, 1) == 1
                    plain = image.format == "JPEG" and image.mode in ("RGB", "L")
        except Exception:  # noqa: BLE001 - PIL's path words the problem
            return False
        return plain and upright and width * height <= self.limits.max_pixels and \
            min(width, height) >= self.limits.min_side

    def _decode(self, payloads: list[bytes]) -> list[torch.Tensor | None]:
        """The JPEGs decoded together (3, H, W) on the device; one that torchvision refuses is None (and the batch is
        decoded one by one to find it)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not payloads:
            return []
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in payloads]
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except (RuntimeError, ValueError):
            decoded = []
            for one in encoded:
                try:
                    decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                except (RuntimeError, ValueError):
                    decoded.append(None)
            return decoded

    def _resize_crop(self, image: torch.Tensor) -> torch.Tensor | str:
        """EvalTransform.pixels on a tensor: the short side to `resize` (antialiased), then the centre crop."""
        height, width = image.shape[1:]
        new_w, new_h = self.transform.resized_size(width, height)
        if (new_w, new_h) != (width, height):
            resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w),
                                                      mode=self.transform.interpolation, antialias=True)
            image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
        crop_h, crop_w = self.transform.crop
        if new_w < crop_w or new_h < crop_h:
            return f"image of {new_w}x{new_h} after resizing is smaller than the {crop_w}x{crop_h} crop"
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))  # torchvision's rounding
        return image[:, top:top + crop_h, left:left + crop_w].contiguous()

    def _through_pil(self, data: bytes) -> torch.Tensor | str:
        pixels = preprocess_or_message(data, self.transform, self.limits, scaled=False)
        return pixels if isinstance(pixels, str) else torch.from_numpy(pixels).to(self.device)
