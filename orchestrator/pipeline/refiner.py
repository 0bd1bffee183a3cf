"""AUTOMATIC1111's refiner: another checkpoint takes over a generation's denoising part way (SDXL's refiner after its
base, or any checkpoint of the same latent space after another).

The switch is by noise level, as AUTOMATIC1111's default and diffusers' denoising_end/denoising_start: from the first
step whose timestep t has (999 - t) / 1000 >= switch_at, the same scheduler (its state, the latents, the noise) goes
on with the refiner's UNet, conditioned on the refiner's own encoding of the prompts (SDXL's refiner: its one text
encoder, and time ids with the aesthetic score), and the refiner's VAE decodes. Its UNet calls are another graph:
the step batcher merges them with other requests' refiner steps only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kiln.errors import InputError
from orchestrator.pipeline.components import Components
from orchestrator.pipeline.conditioning import Prompted
from orchestrator.pipeline.vae_tiles import with_tiles

if TYPE_CHECKING:
    from orchestrator.pipeline.pipeline import Pipeline
    from orchestrator.pipeline.requests import Txt2ImgRequest


@dataclass
class Handover:
    """Where the refiner takes over (the index of its first step in the pass; None: decided at each call, for a
    sampler whose calls are not known ahead, DPM adaptive), what it runs with, and whether it took over (its VAE
    decodes then)."""

    index: int | None
    components: Components
    context: Prompted
    switch_at: float = 1.0
    taken: bool = False

    def starts(self, index: int, timestep) -> bool:
        """Whether call `index`, at `timestep`, runs the refiner's models (from the first that does on, the loop
        keeps them)."""
        starts = index == self.index if self.index is not None else _completed(timestep) >= self.switch_at
        self.taken = self.taken or starts
        return starts


def _completed(timestep) -> float:
    """AUTOMATIC1111's completed ratio at a timestep: (999 - t) / 1000, t rounded to the nearest training one."""
    return (999 - round(float(timestep))) / 1000


def check_refiner(base: Pipeline, refiner: Pipeline, request: Txt2ImgRequest) -> None:
    """InputError naming why `refiner` cannot finish this request of `base`'s."""
    switch_at = request.refiner.switch_at
    if not 0 <= switch_at <= 1:
        raise InputError(f"refiner_switch_at: {switch_at} is not between 0 and 1")
    for what, refused in (("the hires fix", request.hires is not None), ("ControlNet", request.controlnet_units),
                          ("tiling", request.tiling)):
        if refused:
            raise InputError(f"refiner_checkpoint with {what} is not supported yet")
    ours, theirs = base.contract, refiner.contract
    for unet in (ours, theirs):
        if unet.inpainting_unet or unet.edit_unet:
            kind = "inpainting" if unet.inpainting_unet else "instruct-pix2pix"
            raise InputError(f"refiner_checkpoint with an {kind} UNet ({unet.title!r}, {unet.unet_in_channels} "
                             "channels) is not supported")
    if (ours.latent_channels, ours.vae_scale_factor) != (theirs.latent_channels, theirs.vae_scale_factor):
        raise InputError(f"refiner_checkpoint {theirs.title!r}: its latents ({theirs.latent_channels} channels, 1/"
                         f"{theirs.vae_scale_factor} size) are not the checkpoint's ({ours.latent_channels}, 1/"
                         f"{ours.vae_scale_factor})")
    try:
        refiner.check(replace(request, refiner=None, vae=None))  # sizes, LoRA, clip skip within its build
    except InputError as exc:
        raise InputError(f"refiner_checkpoint {theirs.title!r}: {exc}") from None


def switch_index(timesteps, switch_at: float) -> int | None:
    """The first step the refiner runs (AUTOMATIC1111's: the nearest training timestep's completed ratio); None:
    the base runs every step."""
    for index, t in enumerate(timesteps):
        if _completed(t) >= switch_at:
            return index
    return None


def handover(refiner: Pipeline, request: Txt2ImgRequest, prompts: list[str], timesteps,
             batch: int) -> Handover | None:
    """What the refiner runs with from its first step on (None: it never takes over in this pass)."""
    ahead = not hasattr(timesteps, "done")  # DPM adaptive's calls (adaptive.Calls): decided as they run
    index = switch_index(timesteps, request.refiner.switch_at) if ahead else None
    if index is None and ahead:
        return None
    _, loras = refiner.lora_set(request.prompt)  # the prompt's LoRA tags apply to the refiner's models too
    parts = with_tiles(refiner.components.for_request(), request, refiner.limits)  # its own VAE, tiled as asked
    return Handover(index, parts, refiner.encode_prompts(prompts, request, loras).repeat(batch),
                    request.refiner.switch_at)
