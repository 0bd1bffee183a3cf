"""The denoising loop: diffusers' schedulers drive it, injected components run the models.

The pipeline holds no weights and reads no files: the components it is given (over Triton, or in
process) run the models, and their contract (`kiln.contract.SDContract`) says what it needs to
know about the build: the scheduler config, the VAE scale factor, the latent channels, the sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kiln.contract import DEFAULT_MODELS, SDModels
from kiln.errors import InputError
from kiln.imaging import vae_input
from kiln.lora import NOT_BUILT as LORA_NOT_BUILT
from kiln.lora import LoraLibrary, LoraSet, split_lora_tags
from orchestrator.pipeline import conditioning, edit, hires
from orchestrator.pipeline import inpaint as inpainting
from orchestrator.pipeline import refiner as refining
from orchestrator.pipeline.components import Components, Graph, call_graph
from orchestrator.pipeline.conditioning import Prompted, edited
from orchestrator.pipeline.control import control_images
from orchestrator.pipeline.info import run_info
from orchestrator.pipeline.inpaint import finished, init_latents, inpaint_latents, noised, only_masked, sample_latents
from orchestrator.pipeline.requests import Cancelled, GenerationResult, Img2ImgRequest, ProgressCallback, Txt2ImgRequest
from orchestrator.pipeline.restore import paste_back, restores
from orchestrator.pipeline.sampling import editing_steps, img2img_start, initial_noise_scale, schedule, step_kwargs
from orchestrator.pipeline.seeds import Seeds, batch_seeds, draw_seed
from orchestrator.pipeline.step import (
    UNCOND,
    combine,
    counting,
    guidance,
    guides,
    predict,
    skips_unconditional,
    step_settings,
    takes_unconditional,
)
from orchestrator.pipeline.tiles import sd_upscale
from orchestrator.pipeline.vae_tiles import with_tiles
from orchestrator.pipeline.validate import Limits, check_request

if TYPE_CHECKING:
    import torch

NO_LORA = LoraSet()
UNetCall = Callable[[Graph, dict[str, np.ndarray]], np.ndarray]  # runs one UNet call; a StepBatcher merges them


class Pipeline:
    """Stable Diffusion txt2img, img2img, inpainting and ControlNet over `components`, as diffusers computes them."""

    def __init__(self, components: Components, limits: Limits = Limits()) -> None:
        self.components = components
        self.limits = limits

    @classmethod
    def from_triton(cls, url: str, *, timeout_s: float = 600.0, limits: Limits = Limits(),
                    shared_memory: str = "auto") -> Pipeline:
        """Every model in the Triton at `url` (gRPC): what the service runs. `shared_memory`: "auto" sends a
        denoising step's tensors through Triton's system shared memory when Triton is on this host, "on", "off"."""
        from orchestrator.pipeline.components.triton import triton_components

        return cls(triton_components(url, timeout_s=timeout_s, shared_memory=shared_memory), limits)

    @classmethod
    def from_repository(cls, repository: Path, runners: Mapping | None = None, limits: Limits = Limits(),
                        loras: Path | None = None, models: SDModels = DEFAULT_MODELS) -> Pipeline:
        """A built repository's models in process (runtime sessions, or the given runners); `loras`: the folder of
        the LoRA files prompts may name; `models`: the checkpoint's (the repository's default one unless given)."""
        from orchestrator.pipeline.components.local import local_components

        return cls(local_components(repository, runners, loras=LoraLibrary(loras) if loras else None, models=models),
                   limits)

    @property
    def contract(self):
        return self.components.contract

    def close(self) -> None:
        """Release what the components hold (a Triton client's shared-memory regions); the pipeline is done."""
        if self.components.close is not None:
            self.components.close()

    def check(self, request: Txt2ImgRequest) -> None:
        """Raise an InputError naming the bad field before any model runs."""
        check_request(request, self.contract, self.limits)
        self.parts(request)  # sd_vae, the seamless models, VAE tiles: each refused where it cannot run
        if request.tiling and request.controlnet_units:
            raise InputError("tiling with ControlNet is not supported: the build's ControlNets and the UNet they feed "
                             "pad with zeros")
        self.lora_set(request.prompt)
        if request.hires is not None and request.hires.prompt is not None:
            self.lora_set(request.hires.prompt)

    def parts(self, request: Txt2ImgRequest) -> Components:
        """The components `request` runs: its VAE (sd_vae, in tiles or not), seamless or plain."""
        return with_tiles(self.components.for_request(request.vae, request.tiling), request, self.limits)

    def lora_set(self, prompt: str) -> tuple[str, LoraSet]:
        """The prompt without its LoRA tags, and the set they apply (InputError for a name the folder lacks, or a
        build whose models take none)."""
        text, uses = split_lora_tags(prompt)
        if not uses:
            return text, LoraSet()
        if not self.contract.lora_layers:
            raise InputError(LORA_NOT_BUILT.format(name=uses[0].name, why=f"variant {self.contract.variant}, or a "
                                                                          "build before LoRA"))
        return text, (self.components.loras or LoraLibrary(None)).resolve(uses)

    def encode_prompts(self, prompts: list[str], request: Txt2ImgRequest, loras: LoraSet = NO_LORA,
                       hires_steps: int | None = None) -> Prompted:
        """The UNet's conditioning by `prompts` (the negative prompt first where guided) for the request's image, at
        every step of its prompt editing (`hires_steps`: the hires fix's second pass's editing steps)."""
        return conditioning.encode_scheduled(self.components.text_encoder, prompts, request.clip_skip,
                                             loras.spec("text_encoder"), time_ids=self.contract.time_ids,
                                             steps=editing_steps(request.sampler, request.steps),
                                             hires_steps=hires_steps, width=request.width, height=request.height,
                                             pad=request.pad_conds, old_scheduling=request.use_old_scheduling)

    def txt2img(self, request: Txt2ImgRequest, progress: ProgressCallback | None = None,
                cancelled: Callable[[], bool] | None = None, **hooks) -> GenerationResult:
        """Text to image, as diffusers' StableDiffusionPipeline computes it. `hooks`: see generate()."""
        if isinstance(request, Img2ImgRequest):
            raise InputError("txt2img got an img2img request (it has init_image): call img2img")
        return self.generate(request, progress, cancelled, **hooks)

    def img2img(self, request: Img2ImgRequest, progress: ProgressCallback | None = None,
                cancelled: Callable[[], bool] | None = None, **hooks) -> GenerationResult:
        """Image to image (and inpainting, with a mask), as diffusers' img2img/inpaint pipelines compute it."""
        if not isinstance(request, Img2ImgRequest):
            raise InputError("img2img needs an Img2ImgRequest with init_image")
        return self.generate(request, progress, cancelled, **hooks)

    def generate(self, request: Txt2ImgRequest, progress: ProgressCallback | None = None,
                 cancelled: Callable[[], bool] | None = None, *, unet_call: UNetCall | None = None,
                 stop_early: Callable[[], bool] | None = None,
                 denoising: Callable[[], AbstractContextManager] | None = None,
                 refiner: Pipeline | None = None) -> GenerationResult:
        """txt2img, or img2img/inpainting for an Img2ImgRequest.

        progress(step, total, latents) after each step; cancelled() -> True raises Cancelled before
        the next step; stop_early() -> True ends the loop and decodes the latents as they are
        (AUTOMATIC1111's interrupt and skip); unet_call(graph, inputs) runs the UNet calls (a
        StepBatcher merges them with other generations'); denoising() is a context held for the
        loop (the batcher's participant()); `refiner`: the pipeline of request.refiner's checkpoint.
        """
        # 1. Check inputs. The request's VAE (AUTOMATIC1111's sd_vae), or with tiling the seamless UNet and VAE, stand
        # in for the checkpoint's everywhere.
        self.check(request)
        if request.refiner is not None:
            if refiner is None:
                raise InputError(f"refiner_checkpoint {request.refiner.checkpoint!r}: no pipeline was given for it")
            refining.check_refiner(self, refiner, request)
        contract = self.contract
        components = self.parts(request)
        init = isinstance(request, Img2ImgRequest)
        if init and request.sd_upscale is not None:
            return sd_upscale(lambda inner, tile_progress: self.generate(inner, tile_progress, cancelled,
                                                                         unet_call=unet_call, stop_early=stop_early,
                                                                         denoising=denoising, refiner=refiner),
                              request, self.limits.max_image_pixels, progress, self.components.upscalers)
        if init and request.inpainting and request.inpaint_full_res:
            return only_masked(lambda inner: self.generate(inner, progress, cancelled, unet_call=unet_call,
                                                           stop_early=stop_early, denoising=denoising,
                                                           refiner=refiner), request)
        batch = request.batch_size
        guided = guides(request) or edit.image_guided(request, contract)  # (image guidance: at any cfg_scale)

        # 2. Seeds: -1 draws one; image i uses seed + i (AUTOMATIC1111).
        seed = draw_seed(request.seed)
        seeds = batch_seeds(seed, batch)
        seeding = Seeds(seeds, batch_seeds(draw_seed(request.subseed), batch) if request.subseed_strength > 0 else None,
                        request.subseed_strength, request.seed_resize_from, request.eta_noise_seed_delta,
                        request.randn_source)
        generators = seeding.generators()
        generator = generators if batch > 1 else generators[0]

        # 3. Encode the prompts: negative first, as diffusers concatenates them (then each of AND's parts).
        prompt, loras = self.lora_set(request.prompt)  # AUTOMATIC1111's LoRA tags: out of the text, into the models
        prompts, weights = guidance(request.negative_prompt, prompt, guided)
        context = self.encode_prompts(prompts, request, loras).repeat(batch)  # (negative x batch, positive x batch)

        # 4. Scheduler and timesteps; img2img starts where `denoising_strength` says. The hires fix's second pass
        # has its own, made now: progress counts both passes' steps.
        start = img2img_start(request.sampler, request.steps, request.denoising_strength) if init else None
        scheduler, timesteps = schedule(request.sampler, contract.scheduler_config, request.steps, seeds, start,
                                        contract.family, request.sigma_settings, request.discard_penultimate_sigma,
                                        request.eta_ancestral)
        second = None
        if request.hires is not None:
            total, run = hires.second_pass_steps(request.hires, request.steps)
            second = schedule(request.hires.sampler or request.sampler, contract.scheduler_config, total, seeds,
                              total - run, contract.family, request.sigma_settings, request.discard_penultimate_sigma,
                              request.eta_ancestral)

        # 5. Initial latents, drawn like diffusers' pipelines (none where the hires fix's first pass is given).
        shape = (batch, contract.latent_channels, request.height // contract.vae_scale_factor,
                 request.width // contract.vae_scale_factor)
        inpaint, channels = None, None  # channels: what the UNet takes beside the latents (inpainting's, an edit's)
        given = second is not None and request.hires.first_pass is not None
        if given:
            latents, timesteps = None, timesteps[:0]
        elif init and request.inpainting:
            latents, inpaint = inpaint_latents(components.vae, contract, request, shape, generators, generator,
                                               scheduler, timesteps, seeding)
            channels = inpaint.get("channels")
        elif init:
            latents, channels = init_latents(components.vae, contract, request, seeding.for_latents(generators))
            drawn = seeding.noise(shape, generator, contract.vae_scale_factor) * request.initial_noise_multiplier
            if contract.inpainting_unet:  # all of the image masked (AUTOMATIC1111's img2img_image_conditioning)
                channels = inpainting.unmasked_channels(components.vae, contract, request, shape,
                                                        seeding.for_latents(generators))
            if len(timesteps):
                latents = noised(scheduler, timesteps, latents, drawn, request.extra_noise)
        else:
            latents = seeding.noise(shape, generator, contract.vae_scale_factor) * initial_noise_scale(
                request.sampler, scheduler, request.sgm_noise_multiplier)
            channels = inpainting.unmasked_channels(components.vae, contract, request, shape,
                                                    seeding.for_latents(generators))  # (9-channel UNets')

        # 6. ControlNet conditioning: each unit's control image for every row of the UNet batch.
        cond = [] if given else control_images(request, request.width, request.height, len(context), seed)
        restoring = [] if given else restores(request, components.vae, contract, request.width, request.height)

        # 7. Denoising loop (the refiner taking over part way); with the hires fix, the upscale and the second pass
        # (in the batcher like any steps).
        unet_call = unet_call or call_graph
        steps_total = len(timesteps) + (len(second[1]) if second else 0)
        handover = refining.handover(refiner, request, prompts, timesteps, batch) if request.refiner else None
        with denoising() if denoising is not None else nullcontext():
            stopped_at, kept = None, {}  # kept: the request's intermediates (the hires pass's first pass)
            if not given:  # a given first pass (firstpass_image) runs none of its steps
                latents, stopped_at = self._denoise(request, scheduler, timesteps, latents, (context, weights), cond,
                                                    inpaint,
                                                    step_kwargs(scheduler, seeding.for_steps(generator), request.eta,
                                                                step_settings(request)),
                                                    counting(progress, 0, steps_total), cancelled, stop_early,
                                                    unet_call, loras, handover, channels, restoring)
            if inpaint is not None:  # AUTOMATIC1111's last blend (after a stop too)
                latents = inpaint["blend"].final(latents)
            # AUTOMATIC1111's "Pad conds": padding made the negative prompt and the prompt one length in some pass
            padded = context.padded or (handover is not None and handover.context.padded)
            if second is not None and stopped_at is None:
                latents, stopped_at, hires_padded = self._hires_pass(
                    request, latents, (context, prompt, loras), seeding, second,
                    counting(progress, len(timesteps), steps_total), cancelled, stop_early, unet_call, kept)
                padded = padded or hires_padded
                stopped_at = None if stopped_at is None else len(timesteps) + stopped_at

        # 8. Decode (with the refiner's VAE once it took over); AUTOMATIC1111 pastes the original back outside the mask.
        if handover is not None and handover.taken:
            components = handover.components
        images, masks, before = finished(components.vae.decode(latents.numpy()), latents, request, inpaint)
        images = paste_back(images, request.controlnet_units)  # sd-webui-controlnet's inpaint_only (restore.py)
        info = run_info(self, request, seeding, stopped_at, padded)
        if request.refiner is not None:  # AUTOMATIC1111's "Refiner" and "Refiner switch at"
            info |= {"refiner": refiner.contract.title, "refiner_switch_at": request.refiner.switch_at}
        return GenerationResult(images=images, seeds=seeds, info=info, masks=masks, before=kept | before)

    def _denoise(self, request: Txt2ImgRequest, scheduler, timesteps, latents: torch.Tensor, prompted: tuple,
                 cond: list[np.ndarray], inpaint: dict | None, kwargs: dict, progress, cancelled, stop_early,
                 unet_call: UNetCall, loras: LoraSet = NO_LORA, handover: refining.Handover | None = None,
                 channels: torch.Tensor | None = None, restoring: list = ()) -> tuple:
        """The loop itself: returns the final latents, and the step it stopped at when stop_early() asked. The UNets
        run with the LoRA set `loras` (another graph key: the batcher merges rows of one set only); from step
        handover.index on, the refiner's UNet with its conditioning. `prompted`: the conditioning, and the weight of
        each of the prompt's parts (guidance()); `channels`: each image's input channels beside its latents (an
        inpainting UNet's mask and masked image, an instruct-pix2pix UNet's image), on every row; `restoring`: the
        inpaint_only units' Restores, on each prediction."""
        import torch

        components, (context, weights), batch = self.parts(request), prompted, len(latents)
        guided = len(context) > len(weights) * batch  # the negative prompt's rows too (guides())
        cfg = request.cfg_scale * getattr(scheduler, "cfg_scale_multiplier", 1.0)  # DDIM CFG++'s: 1 / 12.5 of it
        along = takes_unconditional(scheduler)  # the unconditional rows' prediction to its step too
        lora = loras.spec("unet")
        image_cfg = request.image_cfg_scale if edit.image_guided(request, self.contract) else None
        blend = None if inpaint is None else inpaint["blend"]
        for index, t in enumerate(timesteps):
            if cancelled is not None and cancelled():
                raise Cancelled(f"cancelled after {index} of {len(timesteps)} steps")
            if stop_early is not None and stop_early():
                return latents, index
            if handover is not None and handover.starts(index, t):
                components, context = handover.components, handover.context
            skip_uncond = guided and skips_unconditional(request.s_min_uncond, scheduler, t, index)
            both = guided and not skip_uncond
            # the rows of each image: unconditional (where run), each part's; image guidance's unconditional again
            copies = len(weights) + both + (image_cfg is not None)
            skip = batch if skip_uncond else 0
            seen = latents if blend is None else blend.model_input(latents, t)
            model_input = scheduler.scale_model_input(torch.cat([seen] * copies) if copies > 1 else seen, t)
            control_input = model_input.numpy()  # what a ControlNet takes: the latents alone
            if channels is not None:
                model_input = torch.cat([model_input, edit.extra_rows(channels, copies, image_cfg is not None)], dim=1)
            inputs = {"sample": model_input.numpy(), "timestep": np.full(len(model_input), float(t), np.float32)}
            at = timesteps.done(False) if hasattr(timesteps, "done") else index  # DPM adaptive's: how far it came
            active = [(unit, unit_cond[skip:], scale, components.controlnet(unit.model))
                      for unit_cond, unit in zip(cond, request.controlnet_units)
                      if (scale := unit.scale_at(at, len(timesteps)))]
            rows = context.at(index) if image_cfg is None else edit.EditRows(context.at(index), batch)
            noise_pred = torch.from_numpy(predict(rows, skip, inputs, control_input, active, components, lora,
                                                  unet_call, channels is not None, batch if both else 0))
            for restore in restoring:  # every row's prediction, as sd-webui-controlnet's hook restores them
                noise_pred = restore.prediction(model_input[:batch, :latents.shape[1]], t, noise_pred)
            # (the stand-in's: combine; image guidance's: the rows without the image, last)
            extra = {UNCOND: noise_pred.chunk(copies)[-1 if image_cfg is not None else 0]} if along else {}
            if image_cfg is not None:
                noise_pred = edit.combine(noise_pred, cfg, image_cfg)
            elif guided:
                noise_pred = combine(noise_pred, weights, cfg, both)
            if blend is not None:  # AUTOMATIC1111's inpainting: the init latents predicted where the mask keeps them
                noise_pred = blend.prediction(scheduler, t, latents, noise_pred)
            latents = scheduler.step(noise_pred, t, latents, **kwargs, **extra).prev_sample
            if progress is not None:
                done = timesteps.done(True) if hasattr(timesteps, "done") else index + 1
                progress(done, len(timesteps), latents.numpy())
        return latents, None

    def _hires_pass(self, request: Txt2ImgRequest, latents: torch.Tensor, first: tuple, seeding: Seeds,
                    second: tuple, progress, cancelled, stop_early, unet_call: UNetCall, kept: dict) -> tuple:
        """The hires fix after the first pass (`first`: its context, prompt text and LoRA set): upscale (latents, or
        the decoded image encoded again), fresh noise from the same seeds at the new size, and the second pass's
        steps (orchestrator.pipeline.hires). hr_prompt's LoRA tags apply to the second pass, as AUTOMATIC1111's. The
        first pass's images go in `kept` where the request's intermediates ask for them."""
        import torch

        contract, fix = self.contract, request.hires
        vae = self.parts(request).vae
        planned = hires.plan(request, contract)
        # Fresh generators from the seeds, as img2img's: the VAE's sample (an image upscaler, a given first pass
        # for a latent mode), then the noise.
        fresh = seeding.generators()
        generator = fresh if len(fresh) > 1 else fresh[0]
        if fix.upscaler not in hires.LATENT_MODES or "highres-fix" in request.intermediates:  # (the first pass's)
            decoded = hires.given_images(request) if latents is None else vae.decode(latents.numpy())
            kept |= {"highres-fix": decoded} if "highres-fix" in request.intermediates else {}
        if fix.upscaler in hires.LATENT_MODES:
            if latents is None:  # firstpass_image, encoded (AUTOMATIC1111's)
                pixels = vae_input(fix.first_pass, request.width, request.height, "firstpass_image")[None]
                latents = sample_latents(torch.from_numpy(vae.encode_pixels(pixels)), seeding.for_latents(fresh),
                                         contract.scaling_factor)
            latents = hires.upscale_latents(latents, fix, planned, contract.vae_scale_factor)
            # a 9-channel UNet's masked image: the decoded latents where the weight keeps some (AUTOMATIC1111's)
            pixels = vae.decode_pixels(latents.numpy()) if request.inpainting_mask_weight < 1 else None
        else:
            pixels = hires.upscale_images(decoded, fix, planned, self.limits.max_image_pixels,
                                          self.components.upscalers)
            moments = torch.from_numpy(vae.encode_pixels(pixels))
            latents = hires.truncate(sample_latents(moments, seeding.for_latents(fresh), contract.scaling_factor),
                                     planned)
        scheduler, timesteps = second
        drawn = seeding.noise(tuple(latents.shape), generator, contract.vae_scale_factor)
        channels = inpainting.unmasked_channels(vae, contract, request, tuple(latents.shape),
                                                seeding.for_latents(fresh), pixels)
        if channels is not None and channels.shape[2:] != latents.shape[2:]:  # an upscaled image's: cropped as they
            channels = hires.truncate(channels, planned)
        latents = noised(scheduler, timesteps, latents, drawn, request.extra_noise)
        context, first_prompt, loras = first
        prompt, loras = (first_prompt, loras) if fix.prompt is None else self.lora_set(fix.prompt)
        negative = request.negative_prompt if fix.negative_prompt is None else fix.negative_prompt
        prompts, weights = guidance(negative, prompt, guides(request))
        units = tuple(replace(unit, second_pass=True) for unit in request.controlnet_units)
        pass_two = replace(request, width=planned.size[0], height=planned.size[1], hires=None, controlnet=units or None)
        # Encoded again for other prompts, for prompt editing (its steps count on from the first pass's), and for
        # SDXL's time ids (the second pass's size, as AUTOMATIC1111's hr conditioning)
        if (prompt, negative, loras) != (first_prompt, request.negative_prompt, first[2]) or edited(prompts) \
                or contract.time_ids:
            steps = editing_steps(fix.sampler or request.sampler, hires.second_pass_steps(fix, request.steps)[1])
            upscaled = replace(pass_two, width=planned.upscale_to[0], height=planned.upscale_to[1])  # SDXL's hr size
            context = self.encode_prompts(prompts, upscaled, loras, hires_steps=steps).repeat(len(latents))
        # sd-webui-controlnet's hr_option "Both": the units act in the second pass too, on their images at its size
        cond = control_images(pass_two, pass_two.width, pass_two.height, len(context), seeding.seeds[0])
        restoring = restores(pass_two, vae, contract, pass_two.width, pass_two.height)
        kwargs = step_kwargs(scheduler, seeding.for_steps(generator), request.eta, step_settings(request))
        return *self._denoise(pass_two, scheduler, timesteps, latents, (context, weights), cond, None, kwargs,
                              progress, cancelled, stop_early, unet_call, loras, None, channels,
                              restoring), context.padded

