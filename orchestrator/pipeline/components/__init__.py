"""The models the denoising loop calls, as injected components (as diffusers' pipelines take their modules).

The pipeline talks to these protocols only. Two implementations are interchangeable: over Triton
(`triton_components`, what the service runs) and in process over runtime sessions or any other
callables (`local_components`, for parity tests, benchmarks and build-time checks). Tensors are
numpy arrays; per-row scalars (`timestep`, `conditioning_scale`) have shape (rows,).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from kiln.contract import SDContract, ServedControlNet
from kiln.errors import InputError
from kiln.lora import LoraLibrary


class Graph(Protocol):
    """A UNet-like call: rows in, noise prediction out. The step batcher merges calls to the same graph."""

    key: str  # what calls must share to be merged into one batch (a Triton model name, and its LoRA set)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def with_lora(self, spec: str) -> Graph:
        """The same model run with a LoRA set (kiln.lora's spec; "": none): another key, so that the step batcher
        never merges rows of different sets."""


CLIP_SKIP_NOT_BUILT = ("clip skip: this build's text encoder serves its last layer only (built before clip skip); "
                       "rebuild with `kiln build sd`")


class TextEncoder(Protocol):
    def encode(self, prompts: Sequence[str], clip_skip: int = 1, lora: str = "") -> np.ndarray:
        """Prompts -> (len(prompts), 77 * chunks, hidden); all prompts share one chunk count. `clip_skip`:
        AUTOMATIC1111's CLIP_stop_at_last_layers (1: the last layer's output); `lora`: the text encoder's LoRA spec
        (kiln.lora.LoraSet.spec)."""

    def encode_pooled(self, prompts: Sequence[str], clip_skip: int = 1, lora: str = "") -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
        """SDXL: the encoding as encode's, and each prompt's pooled text (len(prompts), pooled): its first chunk's."""


def first_chunks(pooled: np.ndarray, prompts: int) -> np.ndarray:
    """Each prompt's pooled text from the (prompts * chunks, pooled) rows of its chunks: its first chunk's (A1111)."""
    return np.ascontiguousarray(pooled.reshape(prompts, -1, pooled.shape[-1])[:, 0])


class VAE(Protocol):
    def encode_image(self, data: bytes, width: int, height: int) -> np.ndarray:
        """Image bytes, resized to width x height -> the latent distribution's parameters (1, 2 * channels, h, w)."""

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) pixels in [-1, 1] -> the latent distribution's parameters."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents (N, channels, h, w) -> uint8 images (N, H, W, 3)."""

    def decode_pixels(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents -> the decoder's float output (N, 3, H, W) in [-1, 1] (what VAE tiles blend)."""


class ControlNet(Protocol):
    served: ServedControlNet  # its name, title and Triton models
    fused: Graph | None  # ControlNet -> UNet in one call (a Triton ensemble), where the build has one

    def residuals(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale -> scaled residuals."""


@dataclass
class Components:
    """Everything the pipeline calls, and the build's contract that describes them."""

    contract: SDContract
    text_encoder: TextEncoder
    unet: Graph  # the plain UNet
    vae: VAE
    unet_control: Graph | None = None  # the UNet taking ControlNet residuals, where the build has ControlNets
    controlnets: Mapping[str, ControlNet] = field(default_factory=dict)  # by name, in build order
    close: Callable[[], None] | None = None  # releases what the components hold (shared-memory regions)
    loras: LoraLibrary | None = None  # the LoRA files prompts may name (headers: the models read the weights)
    vaes: Mapping[str, VAE] = field(default_factory=dict)  # the build's other VAEs by name (contract.vaes)
    # AUTOMATIC1111's tiling: the UNet and the VAE with circular padding (contract.tiling)
    unet_tiling: Graph | None = None
    vae_tiling: VAE | None = None
    # Upscaler networks by name (contract.upscalers): one pass each, a PIL image in, kiln.upscale.Network
    upscalers: Mapping[str, Callable] = field(default_factory=dict)

    def vae_for(self, name: str | None) -> VAE:
        """The VAE AUTOMATIC1111's sd_vae names (None, Automatic, None: the checkpoint's); InputError for another."""
        served = self.contract.vae(name)
        if served is None:
            return self.vae
        if served.name not in self.vaes:
            raise InputError(f"sd_vae: {served.name} is not served by these components")
        return self.vaes[served.name]

    def for_request(self, vae: str | None = None, tiling: bool = False) -> Components:
        """The components one request runs: its VAE (sd_vae), and with tiling the seamless UNet and VAE (InputError
        where the build has none, or with another VAE: only the checkpoint's own is built seamless)."""
        if not tiling:
            return replace(self, vae=self.vae_for(vae))
        if self.unet_tiling is None or self.vae_tiling is None:
            raise InputError("tiling: this build serves no seamless models; rebuild with `kiln build sd --tiling`")
        if self.contract.vae(vae) is not None:
            raise InputError("tiling with another VAE (sd_vae) is not supported: the build's seamless VAE is the "
                             "checkpoint's own")
        return replace(self, unet=self.unet_tiling, vae=self.vae_tiling)

    def controlnet(self, model: str | None) -> ControlNet:
        """The ControlNet a unit names (its name or title; None: the first); InputError for an unknown one."""
        return self.controlnets[self.contract.controlnet(model).name]


@dataclass
class NetworkUpscaler:
    """One pass of an upscaler network (kiln.upscale.Network) over any runner of its model: uint8 RGB in, its scale
    out, as AUTOMATIC1111 runs ESRGAN (pixels / 255, the output clamped to [0, 1], x 255 rounded). An output over
    `max_pixels` is refused before the network runs."""

    name: str
    scale: int
    run: Callable[[np.ndarray], np.ndarray]  # (1, 3, H, W) float32 in [0, 1] -> (1, 3, sH, sW)
    max_pixels: int = 16_777_216

    def __call__(self, image):
        from PIL import Image

        width, height = image.width * self.scale, image.height * self.scale
        if width * height > self.max_pixels:
            raise InputError(f"upscaler {self.name}: x{self.scale} makes the {image.width}x{image.height} image "
                             f"{width}x{height} = {width * height} pixels, over the limit of {self.max_pixels}")
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None] / np.float32(255)
        out = self.run(np.ascontiguousarray(pixels))[0].transpose(1, 2, 0)
        return Image.fromarray((out * 255).round().clip(0, 255).astype(np.uint8))


def call_graph(graph: Graph, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Run a graph at once: the default when no step batcher merges the calls."""
    return graph(inputs)
