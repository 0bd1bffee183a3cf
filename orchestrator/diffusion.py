"""The denoising loop over Triton: diffusers' schedulers drive it, Triton runs every model.

The orchestrator holds no weights and reads no files: what it needs to drive the loop (the
checkpoint's scheduler config, the VAE scale factor, the latent channels, the size limits) comes
from the `sd_unet` model's config parameters. Noise is drawn exactly as diffusers draws it (torch
CPU generators, one per image, seed + i for image i as AUTOMATIC1111 does), so a seed gives the
same image as diffusers' own pipeline.
"""

from __future__ import annotations

import json
import math
import secrets
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np

from build.errors import InputError, KilnError, ServerError
from orchestrator.samplers import SAMPLERS, make_scheduler

if TYPE_CHECKING:
    import torch

MAX_STEPS = 500
MAX_BATCH = 8
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet conditioning, as sd-webui-controlnet's unit describes it."""

    image: bytes  # the control image (an edge map, or a photo with module="canny")
    module: str = "none"  # preprocessor: none, or canny (built in)
    weight: float = 1.0  # conditioning scale
    guidance_start: float = 0.0  # fraction of the steps where the ControlNet starts acting
    guidance_end: float = 1.0  # ... and where it stops
    low_threshold: int = 100  # canny thresholds, on 0-255 intensities
    high_threshold: int = 200
    model: str | None = None  # which of the build's ControlNets, by name ("name [hash]" too); None: the first


@dataclass(frozen=True)
class Txt2ImgRequest:
    """One txt2img job, with AUTOMATIC1111's field meanings."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0  # 1 = no classifier-free guidance (no negative branch)
    seed: int = -1  # -1: a random seed, reported in the result
    width: int = 512
    height: int = 512
    batch_size: int = 1
    eta: float = 0.0  # DDIM's eta (other samplers ignore it)
    controlnet: ControlNetUnit | tuple[ControlNetUnit, ...] | None = None  # one unit, or several (summed residuals)
    subseed: int = -1  # variation seed (AUTOMATIC1111): its noise is mixed in by subseed_strength
    subseed_strength: float = 0.0  # 0: the seed's noise alone; 1: the subseed's alone

    @property
    def controlnet_units(self) -> tuple[ControlNetUnit, ...]:
        if self.controlnet is None:
            return ()
        return (self.controlnet,) if isinstance(self.controlnet, ControlNetUnit) else tuple(self.controlnet)


@dataclass(frozen=True)
class Img2ImgRequest(Txt2ImgRequest):
    """img2img: the init image is encoded, noised to the step `denoising_strength` selects, then denoised."""

    init_image: bytes = b""  # encoded image (PNG/JPEG/...); resized to width x height ("just resize")
    denoising_strength: float = 0.75  # 0: the init image back; 1: all steps, nothing of the image's layout kept
    mask: bytes = b""  # inpainting: white = repaint, black = keep (empty: plain img2img)
    mask_blur: int = 4  # Gaussian blur radius applied to the mask first (AUTOMATIC1111's default 4)
    inpainting_mask_invert: bool = False  # repaint the black part instead
    # What the masked area starts from (AUTOMATIC1111's names): 0 fill (the surrounding colours, blurred in),
    # 1 original, 2 latent noise, 3 latent nothing (zeros). Matters when denoising_strength < 1.
    inpainting_fill: int = 1
    overlay: bool = False  # paste the init image back outside the (blurred) mask, as AUTOMATIC1111 finishes
    # AUTOMATIC1111's "only masked": inpaint a crop around the mask (plus padding, widened to width:height)
    # at width x height, then scale it back into the init image, which keeps its own size.
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 0


@dataclass(frozen=True)
class ServedControlNet:
    """One ControlNet of the build: its name, its Triton model and its ControlNet -> UNet ensemble."""

    name: str
    model: str = "sd_controlnet"
    ensemble: str = "sd_controlnet_unet"  # "": none (a 9-channel UNet's ControlNet takes other inputs than it)
    sha256: str = ""

    @property
    def title(self) -> str:
        """sd-webui-controlnet's model title: name [first 8 hex digits of the hash]."""
        return f"{self.name} [{self.sha256[:8]}]" if self.sha256 else self.name


@dataclass
class GenerationResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    seeds: list[int]
    info: dict = field(default_factory=dict)


class Cancelled(KilnError):
    """The caller cancelled the job between two denoising steps."""


ProgressCallback = Callable[[int, int, np.ndarray], None]  # (step done, total steps, current latents)
UNetCall = Callable[[str, dict[str, np.ndarray]], np.ndarray]  # (model, float32 inputs) -> noise_pred


class TritonDiffusion:
    """A Stable Diffusion pipeline whose models all run in Triton (sd_text_encode, sd_unet, sd_vae_decode)."""

    def __init__(self, url: str, *, timeout_s: float = 600.0) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.timeout_s = timeout_s
        from tritonclient.utils import InferenceServerException

        try:
            config = self.client.get_model_config("sd_unet", as_json=True)["config"]
        except InferenceServerException as exc:
            raise ServerError(f"cannot read sd_unet's config from Triton at {url} ({exc.message() or exc}); "
                            "is `kiln serve` running a repository built with `kiln build sd`?") from None
        self._configure({k: v["string_value"] for k, v in config.get("parameters", {}).items()},
                        int(config.get("max_batch_size", 1)))
        if not self.controlnets:  # a repository built before several ControlNets: at most the one
            self.controlnets = {"controlnet": ServedControlNet("controlnet")}
        try:
            self.has_controlnet = bool(self.client.is_model_ready(next(iter(self.controlnets.values())).model))
        except InferenceServerException:
            self.has_controlnet = False

    def _configure(self, params: dict[str, str], unet_max_batch: int) -> None:
        """What the loop needs to know, from sd_unet's config parameters (written by `kiln build sd`)."""
        try:
            self.scheduler_config = json.loads(params["scheduler_config"])
            self.vae_scale_factor = int(params["vae_scale_factor"])
            self.latent_channels = int(params["latent_channels"])
            self.unet_in_channels = int(params["unet_in_channels"])
            self.latent_scaling_factor = float(params["scaling_factor"])
            self.min_size, self.max_size = int(params["min_size"]), int(params["max_size"])
            self.size_multiple = int(params["size_multiple"])
        except KeyError as exc:
            raise KilnError(f"sd_unet's config lacks the parameter {exc}; rebuild the repository with `kiln build sd`") from None
        self.model_name = params.get("model_name", "sd")
        self.model_sha256 = params.get("model_sha256", "")
        self.model_hash = self.model_sha256[:10]
        self.unet_max_batch = unet_max_batch
        self.controlnets = {entry["name"]: ServedControlNet(**entry) for entry in json.loads(params.get("controlnets", "[]"))}

    def controlnet_for(self, model: str | None) -> ServedControlNet:
        """The ControlNet a unit's `model` names: its name, or its title "name [hash]"; None/"None": the first."""
        served = list(self.controlnets.values())
        if model is None or model.strip() in ("", "None"):
            return served[0]
        wanted = model.strip()
        for candidate in served:
            if wanted in (candidate.name, candidate.title) or wanted.rsplit(" [", 1)[0] == candidate.name:
                return candidate
        raise InputError(f"unknown ControlNet model {model!r}; this build serves: "
                         f"{', '.join(c.title for c in served)}")

    # -- model calls ----------------------------------------------------------------------------
    def _infer(self, model: str, inputs: dict[str, tuple[np.ndarray, str]], outputs: list[str]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        tensors = []
        for name, (array, dtype) in inputs.items():
            tensor = self._grpc.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        try:
            result = self.client.infer(model, tensors, outputs=[self._grpc.InferRequestedOutput(n) for n in outputs],
                                       client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            status = str(exc.status())
            if "INVALID_ARG" in status:  # the model's verdict on the input
                raise InputError(f"{model}: {exc.message() or exc}") from None
            if "UNAVAILABLE" in status or "NOT_FOUND" in status:  # Triton down, restarting, or the model unloaded
                raise ServerError(f"Triton cannot run {model} now: {exc.message() or exc}") from None
            raise KilnError(f"{model}: {exc.message() or exc}") from None
        return {n: result.as_numpy(n) for n in outputs}

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> (len(prompts), 77 * chunks, hidden); all prompts share one chunk count."""
        out = self._infer("sd_text_encode", {"prompt": (np.array([p.encode() for p in prompts], dtype=object), "BYTES")},
                          ["embeddings", "chunks"])
        chunks = int(out["chunks"][0])
        embeddings = out["embeddings"]
        return embeddings.reshape(len(prompts), chunks * embeddings.shape[1], embeddings.shape[2])

    def unet(self, sample: np.ndarray, timesteps: np.ndarray, context: np.ndarray, call: UNetCall | None = None) -> np.ndarray:
        """One UNet evaluation (per-sample timesteps); `call` runs it (default: at once; a StepBatcher merges)."""
        return (call or self.noise_pred)("sd_unet", dict(sample=sample, timestep=timesteps.reshape(-1, 1),
                                                         encoder_hidden_states=context))

    def controlnet_unet(self, sample: np.ndarray, timesteps: np.ndarray, context: np.ndarray, cond: np.ndarray,
                        scales: np.ndarray, call: UNetCall | None = None, ensemble: str = "sd_controlnet_unet") -> np.ndarray:
        """ControlNet then the UNet with its residuals, in one ensemble call (per-sample scales)."""
        return (call or self.noise_pred)(ensemble, dict(
            sample=sample, timestep=timesteps.reshape(-1, 1), encoder_hidden_states=context, controlnet_cond=cond,
            conditioning_scale=scales.reshape(-1, 1)))

    def multi_controlnet_unet(self, sample: np.ndarray, timesteps: np.ndarray, context: np.ndarray,
                              units: list[tuple[np.ndarray, float, str]], call: UNetCall | None = None,
                              control_sample: np.ndarray | None = None) -> np.ndarray:
        """Several ControlNet units (control image, scale, ControlNet model): each one's residuals (scaled in the
        model), summed, then the UNet with them. `control_sample`: the ControlNets' input when it is not the
        UNet's (a 9-channel inpainting UNet also takes the mask and the masked image; its ControlNets do not).

        As diffusers' MultiControlNetModel does. The residuals pass through the orchestrator (the
        ensemble runs one unit); the UNet call goes through `call`, so it still joins step batches.
        """
        total: dict[str, np.ndarray] = {}
        for cond, scale, model in units:
            inputs = dict(sample=sample if control_sample is None else control_sample,
                          timestep=timesteps.reshape(-1, 1), encoder_hidden_states=context,
                          controlnet_cond=cond, conditioning_scale=np.full((len(sample), 1), scale, np.float32))
            for name, value in self._rows(model, inputs, self._controlnet_outputs(model)).items():
                total[name] = total[name] + value if name in total else value
        return (call or self.noise_pred)("sd_unet_control", dict(
            sample=sample, timestep=timesteps.reshape(-1, 1), encoder_hidden_states=context, **total))

    def _controlnet_outputs(self, model: str) -> list[str]:
        """The residual outputs' names (the same for every ControlNet of a build: they all feed sd_unet_control)."""
        if not hasattr(self, "_residual_names"):
            config = self.client.get_model_config(model, as_json=True)["config"]
            self._residual_names = [o["name"] for o in config["output"]]
        return self._residual_names

    def _rows(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Call a batched model on float32 inputs of any number of rows, split into batches it takes."""
        rows = len(inputs["sample"])
        parts = []
        for start in range(0, rows, self.unet_max_batch):
            chunk = {name: (np.ascontiguousarray(value[start:start + self.unet_max_batch], dtype=np.float32), "FP32")
                     for name, value in inputs.items()}
            parts.append(self._infer(model, chunk, outputs))
        return {name: np.concatenate([part[name] for part in parts]) for name in outputs}

    def noise_pred(self, model: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Call a UNet-like model on float32 inputs, split into batches the model takes."""
        return self._rows(model, inputs, ["noise_pred"])["noise_pred"]

    def encode_image(self, data: bytes, width: int, height: int) -> np.ndarray:
        """Image bytes -> the VAE's latent distribution parameters (1, 2 * latent channels, h, w)."""
        try:
            out = self._infer("sd_vae_encode", {"image": (np.array([[data]], dtype=object), "BYTES"),
                                                "size": (np.array([[height, width]], dtype=np.int32), "INT32")},
                              ["moments"])
        except InputError as exc:
            raise InputError(f"init image: {exc}") from None
        return np.array(out["moments"])  # a writable copy: torch refuses read-only buffers

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) pixels in [-1, 1] -> the VAE's latent distribution parameters, through sd_vae_encoder."""
        out = self._infer("sd_vae_encoder", {"image": (np.ascontiguousarray(pixels, dtype=np.float32), "FP32")},
                          ["moments"])
        return np.array(out["moments"])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._infer("sd_vae_decode", {"latent": (np.ascontiguousarray(latents, dtype=np.float32), "FP32")},
                           ["image"])["image"]

    # -- txt2img --------------------------------------------------------------------------------
    def check(self, request: Txt2ImgRequest) -> None:
        """Raise InputError naming the bad field before any model runs."""
        multiple = self.size_multiple
        for name in ("width", "height"):
            value = getattr(request, name)
            if not isinstance(value, int) or value % multiple:
                raise InputError(f"{name} must be a multiple of {multiple}, got {value!r}")
            if not self.min_size <= value <= self.max_size:
                raise InputError(f"{name} must be within the built profile [{self.min_size}, {self.max_size}], got {value}")
        if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
            raise InputError(f"steps must be between 1 and {MAX_STEPS}, got {request.steps!r}")
        if not isinstance(request.batch_size, int) or not 1 <= request.batch_size <= MAX_BATCH:
            raise InputError(f"batch_size must be between 1 and {MAX_BATCH}, got {request.batch_size!r}")
        if not math.isfinite(request.cfg_scale) or request.cfg_scale < 1:
            raise InputError(f"cfg_scale must be a finite number >= 1, got {request.cfg_scale!r}")
        if not math.isfinite(request.eta) or not 0 <= request.eta <= 1:
            raise InputError(f"eta must be in [0, 1], got {request.eta!r}")
        if not isinstance(request.seed, int) or not -1 <= request.seed <= MAX_SEED:
            raise InputError(f"seed must be -1 (random) or in [0, 2^32 - 1], got {request.seed!r}")
        if not isinstance(request.subseed, int) or not -1 <= request.subseed <= MAX_SEED:
            raise InputError(f"subseed must be -1 (random) or in [0, 2^32 - 1], got {request.subseed!r}")
        if not math.isfinite(request.subseed_strength) or not 0 <= request.subseed_strength <= 1:
            raise InputError(f"subseed_strength must be in [0, 1], got {request.subseed_strength!r}")
        if request.sampler not in SAMPLERS:
            make_scheduler(request.sampler, self.scheduler_config)  # raises the error listing valid names
        units = request.controlnet_units
        if units and not self.has_controlnet:
            raise InputError("controlnet: this build has no ControlNet (build with --controlnet or a controlnet/ folder)")
        if len(units) > MAX_CONTROLNET_UNITS:
            raise InputError(f"controlnet: {len(units)} units; at most {MAX_CONTROLNET_UNITS} per request")
        for index, unit in enumerate(units):
            name = "controlnet" if len(units) == 1 else f"controlnet unit {index}"
            if not isinstance(unit, ControlNetUnit):
                raise InputError(f"{name} is not a ControlNet unit")
            if unit.module not in CONTROL_MODULES:
                raise InputError(f"{name} module {unit.module!r} is unknown; valid: {', '.join(CONTROL_MODULES)}")
            if not math.isfinite(unit.weight) or not 0 <= unit.weight <= 2:
                raise InputError(f"{name} weight must be in [0, 2], got {unit.weight!r}")
            if not 0 <= unit.low_threshold < unit.high_threshold <= 255:
                raise InputError(f"{name} canny thresholds must satisfy 0 <= low < high <= 255, "
                                 f"got {unit.low_threshold!r}, {unit.high_threshold!r}")
            if not (0 <= unit.guidance_start < unit.guidance_end <= 1):
                raise InputError(f"{name} guidance_start/end must satisfy 0 <= start < end <= 1, "
                                 f"got {unit.guidance_start!r}, {unit.guidance_end!r}")
            if unit.model is not None and not isinstance(unit.model, str):
                raise InputError(f"{name} model must be a ControlNet's name, got {unit.model!r}")
            try:
                self.controlnet_for(unit.model)
            except InputError as exc:
                raise InputError(f"{name}: {exc}") from None
        if isinstance(request, Img2ImgRequest):
            if not request.init_image:
                raise InputError("init_image is empty")
            if not math.isfinite(request.denoising_strength) or not 0 <= request.denoising_strength <= 1:
                raise InputError(f"denoising_strength must be in [0, 1], got {request.denoising_strength!r}")
            if not isinstance(request.mask_blur, int) or not 0 <= request.mask_blur <= 64:
                raise InputError(f"mask_blur must be an integer in [0, 64], got {request.mask_blur!r}")
            if request.inpainting_fill not in INPAINTING_FILL:
                raise InputError(f"inpainting_fill must be one of {', '.join(f'{k} ({v})' for k, v in INPAINTING_FILL.items())}"
                                 f", got {request.inpainting_fill!r}")
        inpainting = isinstance(request, Img2ImgRequest) and bool(request.mask)
        if self.unet_in_channels != self.latent_channels:
            if not inpainting:
                raise InputError("this checkpoint's UNet is an inpainting UNet: it needs init_image and mask")
        if inpainting and int(request.steps * request.denoising_strength) < 1:
            raise InputError(f"inpainting needs at least one denoising step: steps x denoising_strength = "
                             f"{request.steps} x {request.denoising_strength} rounds down to 0")

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
                 denoising: Callable[[], ContextManager] | None = None) -> GenerationResult:
        """txt2img, or img2img/inpainting for an Img2ImgRequest.

        progress(step, total, latents) after each step; cancelled() -> True raises Cancelled before
        the next step; stop_early() -> True ends the loop and decodes the latents as they are
        (AUTOMATIC1111's interrupt and skip); unet_call runs the UNet calls (a StepBatcher merges
        them with other generations'); denoising() is a context held for the loop (the batcher's
        participant()).
        """
        import torch

        # 1. Check inputs.
        self.check(request)
        if isinstance(request, Img2ImgRequest) and request.mask and request.inpaint_full_res:
            return self._inpaint_only_masked(request, progress, cancelled, unet_call=unet_call, stop_early=stop_early,
                                             denoising=denoising)
        batch = request.batch_size
        guided = request.cfg_scale > 1
        init = isinstance(request, Img2ImgRequest)

        # 2. Seeds: -1 draws one; image i uses seed + i (AUTOMATIC1111).
        seed = secrets.randbelow(MAX_SEED + 1) if request.seed == -1 else request.seed
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(batch)]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        generator = generators if batch > 1 else generators[0]
        variation = None
        if request.subseed_strength > 0:
            subseed = secrets.randbelow(MAX_SEED + 1) if request.subseed == -1 else request.subseed
            variation = ([(subseed + i) % (MAX_SEED + 1) for i in range(batch)], request.subseed_strength)

        # 3. Encode the prompts: negative first, as diffusers concatenates them.
        prompts = [request.negative_prompt, request.prompt] if guided else [request.prompt]
        context = np.repeat(self.encode_prompts(prompts), batch, axis=0)  # (negative x batch, positive x batch)

        # 4. Scheduler and timesteps; img2img starts where `denoising_strength` says.
        scheduler = make_scheduler(request.sampler, self.scheduler_config, seed=seed)
        try:
            scheduler.set_timesteps(request.steps)
        except ValueError as exc:  # e.g. LCM takes at most as many steps as its original schedule
            raise InputError(f"steps: {request.sampler} cannot run {request.steps} steps ({exc})") from None
        timesteps = scheduler.timesteps
        if init:
            start = request.steps - min(int(request.steps * request.denoising_strength), request.steps)
            timesteps = timesteps[start * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)

        # 5. Initial latents, drawn like diffusers' pipelines.
        shape = (batch, self.latent_channels, request.height // self.vae_scale_factor, request.width // self.vae_scale_factor)
        inpaint = None
        if init and request.mask:
            latents, noise, inpaint = self._inpaint_latents(request, shape, generators, generator, scheduler, timesteps,
                                                            variation)
        elif init:
            latents = self._init_latents(request, generators)
            noise = _noise(shape, generator, variation)
            if len(timesteps):
                latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(batch))
        else:
            latents = _noise(shape, generator, variation) * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator, request.eta)

        # 6. ControlNet conditioning: each unit's control image for every row of the UNet batch.
        cond = [np.repeat(control_image(unit, request.width, request.height)[None], len(context), axis=0)
                for unit in request.controlnet_units]

        # 7. Denoising loop.
        with denoising() if denoising is not None else nullcontext():
            latents, stopped_at = self._denoise(request, scheduler, timesteps, latents, context, cond, inpaint, noise
                                                if init else None, step_kwargs, progress, cancelled, stop_early,
                                                unet_call)

        # 8. Decode; AUTOMATIC1111 pastes the original back outside the mask.
        images = self.decode(latents.numpy())
        if init and request.mask and request.overlay:
            images = paste_outside_mask(images, request)
        info = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
                "sampler": request.sampler, "cfg_scale": request.cfg_scale, "seed": seeds[0], "all_seeds": seeds,
                "width": request.width, "height": request.height, "model": self.model_name,
                "model_hash": self.model_hash or None}
        if variation is not None:
            info |= {"subseed": variation[0][0], "all_subseeds": variation[0], "subseed_strength": variation[1]}
        if stopped_at is not None:
            info["stopped_at_step"] = stopped_at
        if init:
            info["denoising_strength"] = request.denoising_strength
        if init and request.mask:
            info |= {"mask_blur": request.mask_blur, "inpainting_mask_invert": request.inpainting_mask_invert,
                     "inpainting_fill": request.inpainting_fill}
        if request.controlnet_units:
            info["controlnet"] = [f"\"Module: {unit.module}, Model: {self.controlnet_for(unit.model).title}, "
                                  f"Weight: {unit.weight}, Guidance Start: {unit.guidance_start}, "
                                  f"Guidance End: {unit.guidance_end}\""
                                  for unit in request.controlnet_units]
        return GenerationResult(images=images, seeds=seeds, info=info)

    def _inpaint_only_masked(self, request: Img2ImgRequest, progress, cancelled, **loop) -> GenerationResult:
        """AUTOMATIC1111's inpaint_full_res: generate the masked region's crop at full size, paste it back."""
        from dataclasses import replace

        from PIL import Image

        from build.imaging import ImageLimits, decode_image

        original = decode_image(request.init_image, ImageLimits(min_side=1))
        width, height = original.size
        mask = soft_mask(request.mask, width, height, request.mask_blur, request.inpainting_mask_invert)
        box = crop_region(np.asarray(mask) > 0, request.inpaint_full_res_padding, request.width, request.height)
        if box is None:  # nothing masked: whole-picture inpainting (which keeps everything)
            return self.generate(replace(request, inpaint_full_res=False), progress, cancelled, **loop)
        region = (box[2] - box[0], box[3] - box[1])
        crop = original.crop(box).resize((request.width, request.height), Image.Resampling.LANCZOS)
        crop_mask = mask.crop(box).resize((request.width, request.height), Image.Resampling.LANCZOS)
        inner = replace(request, init_image=_png(crop), mask=_png(crop_mask), mask_blur=0, inpainting_mask_invert=False,
                        inpaint_full_res=False, overlay=False)  # the mask is already blurred and inverted
        result = self.generate(inner, progress, cancelled, **loop)
        keep = Image.eval(mask, lambda v: 255 - v)
        images = []
        for generated in result.images:
            canvas = original.copy()
            canvas.paste(Image.fromarray(generated).resize(region, Image.Resampling.LANCZOS), box[:2])
            if request.overlay:
                canvas.paste(original, (0, 0), keep)  # the init image back outside the blurred mask
            images.append(np.asarray(canvas, dtype=np.uint8))
        info = result.info | {"mask_blur": request.mask_blur, "inpainting_mask_invert": request.inpainting_mask_invert,
                              "inpaint_full_res": True, "inpaint_full_res_padding": request.inpaint_full_res_padding,
                              "inpaint_region": list(box)}
        return GenerationResult(images=np.stack(images), seeds=result.seeds, info=info)

    def _denoise(self, request, scheduler, timesteps, latents, context, cond, inpaint, noise, step_kwargs, progress,
                 cancelled, stop_early, unet_call) -> tuple:
        """The loop itself: returns the final latents, and the step it stopped at when stop_early() asked."""
        import torch

        guided = request.cfg_scale > 1
        for index, t in enumerate(timesteps):
            if cancelled is not None and cancelled():
                raise Cancelled(f"cancelled after {index} of {len(timesteps)} steps")
            if stop_early is not None and stop_early():
                return latents, index
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            control_input = model_input  # what a ControlNet takes: the latents alone
            if inpaint is not None and self.unet_in_channels != self.latent_channels:  # 9-channel inpainting UNet
                model_input = torch.cat([model_input, inpaint["mask_input"], inpaint["masked_input"]], dim=1)
            step_t = np.full(len(model_input), float(t), np.float32)
            active = [(unit_cond, scale, self.controlnet_for(unit.model))
                      for unit_cond, unit in zip(cond, request.controlnet_units)
                      if (scale := _control_scale(unit, index, len(timesteps)))]
            if len(active) == 1 and active[0][2].ensemble and control_input is model_input:
                unit_cond, scale, served = active[0]
                noise_pred = self.controlnet_unet(model_input.numpy(), step_t, context, unit_cond,
                                                  np.full(len(model_input), scale, np.float32), call=unet_call,
                                                  ensemble=served.ensemble)
            elif active:
                noise_pred = self.multi_controlnet_unet(model_input.numpy(), step_t, context,
                                                        [(c, scale, served.model) for c, scale, served in active],
                                                        call=unet_call, control_sample=control_input.numpy())
            else:  # no ControlNet, or outside its guidance window: zero residuals equal the plain UNet exactly
                noise_pred = self.unet(model_input.numpy(), step_t, context, call=unet_call)
            noise_pred = torch.from_numpy(noise_pred)
            if guided:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + request.cfg_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if inpaint is not None and self.unet_in_channels == self.latent_channels:
                # A standard UNet inpaints by blending: outside the mask, the init image noised to the next step.
                proper = inpaint["image_latents"]
                if index < len(timesteps) - 1:
                    proper = scheduler.add_noise(proper, noise, torch.tensor([timesteps[index + 1]]))
                latents = (1 - inpaint["mask"]) * proper + inpaint["mask"] * latents
            if progress is not None:
                progress(index + 1, len(timesteps), latents.numpy())
        return latents, None

    def _inpaint_latents(self, request: Img2ImgRequest, shape: tuple, generators: list, generator, scheduler,
                         timesteps, variation) -> tuple:
        """diffusers' StableDiffusionInpaintPipeline, in its order of random draws: image latents, noise, masked-image latents."""
        import torch
        import torch.nn.functional as F

        from build.imaging import resized_rgb, unit_range, vae_input

        batch = shape[0]
        pixels = vae_input(request.init_image, request.width, request.height)
        mask = inpaint_mask(request.mask, request.width, request.height, request.mask_blur,
                            request.inpainting_mask_invert)
        masked = pixels * (mask < 0.5)
        start_pixels = pixels
        if request.inpainting_fill == 0:  # "fill": the masked area repainted with the surrounding colours first
            start_pixels = np.float32(2.0) * unit_range(fill_masked(resized_rgb(request.init_image, request.width,
                                                                                request.height), mask)) - np.float32(1.0)
        moments = torch.from_numpy(self.encode_pixels(np.stack([start_pixels, masked])))
        strength_max = request.denoising_strength == 1.0
        blending = self.unet_in_channels == self.latent_channels
        # diffusers samples the image latents only when it blends (4-channel UNet) or starts from the image.
        image_latents = self._sample_latents(moments[:1], generators) if blending or not strength_max else None
        noise = _noise(shape, generator, variation)
        mask_latent = F.interpolate(torch.from_numpy(mask[None]), size=shape[2:]).repeat(batch, 1, 1, 1)
        if strength_max:
            latents = noise * scheduler.init_noise_sigma
        else:
            start = image_latents
            if request.inpainting_fill == 2:  # "latent noise": the seeds' noise where the mask repaints
                start = image_latents * (1 - mask_latent) + noise * mask_latent
            elif request.inpainting_fill == 3:  # "latent nothing": zeros there
                start = image_latents * (1 - mask_latent)
            latents = scheduler.add_noise(start, noise, timesteps[:1].repeat(batch))
        masked_latents = self._sample_latents(moments[1:], generators)
        guided = request.cfg_scale > 1
        return latents, noise, {
            "image_latents": image_latents, "mask": mask_latent,
            "mask_input": torch.cat([mask_latent] * 2) if guided else mask_latent,
            "masked_input": torch.cat([masked_latents] * 2) if guided else masked_latents,
        }

    def _sample_latents(self, moments: "torch.Tensor", generators: list) -> "torch.Tensor":
        """Sample the VAE's latent distribution with each image's generator, scaled (diffusers' _encode_vae_image)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))  # DiagonalGaussianDistribution
        return torch.cat([mean + std * randn_tensor(mean.shape, generator=g, dtype=torch.float32)
                          for g in generators]) * self.latent_scaling_factor

    def _init_latents(self, request: Img2ImgRequest, generators: list) -> "torch.Tensor":
        """Encode the init image and sample its latents with each image's own generator (diffusers' retrieve_latents)."""
        import torch

        return self._sample_latents(torch.from_numpy(self.encode_image(request.init_image, request.width,
                                                                        request.height)), generators)


CONTROL_MODULES = ("none", "canny")
MAX_CONTROLNET_UNITS = 4


def control_image(unit: ControlNetUnit, width: int, height: int) -> np.ndarray:
    """The ControlNet's input (3, height, width) in [0, 1], as diffusers' control image processor makes it."""
    from build.imaging import resized_rgb, unit_range

    image = resized_rgb(unit.image, width, height, "controlnet image")
    if unit.module == "canny":
        image = canny(image, unit.low_threshold, unit.high_threshold)
    return unit_range(image)


INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def soft_mask(data: bytes, width: int, height: int, blur: int, invert: bool):
    """The mask as a PIL "L" image, white = repaint: AUTOMATIC1111's invert, then its Gaussian blur.

    A partly transparent mask is read by its alpha channel (opaque = repaint), as AUTOMATIC1111 does.
    """
    import io

    from PIL import Image, ImageFilter, ImageOps

    from build.imaging import resized_rgb

    rgb = resized_rgb(data, width, height, "mask")  # validates the bytes (format, size limits) first
    raw = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if raw.mode in ("RGBA", "LA", "PA") and raw.getchannel("A").getextrema()[0] < 255:
        mask = raw.getchannel("A")
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    else:
        mask = rgb.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


def inpaint_mask(data: bytes, width: int, height: int, blur: int, invert: bool) -> np.ndarray:
    """The mask (1, height, width) the pipeline uses: the soft mask, then diffusers' binarize (1 = repaint)."""
    from build.imaging import unit_range

    values = unit_range(soft_mask(data, width, height, blur, invert))
    return np.where(values < 0.5, np.float32(0), np.float32(1))


def crop_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) around the mask's True pixels, `padding` wider on each side and then
    widened to the aspect ratio width:height, kept inside the image (AUTOMATIC1111's "only masked" crop); None
    when nothing is masked."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    image_h, image_w = mask.shape
    left, right = max(int(cols.min()) - padding, 0), min(int(cols.max()) + 1 + padding, image_w)
    top, bottom = max(int(rows.min()) - padding, 0), min(int(rows.max()) + 1 + padding, image_h)

    def widen(low: int, high: int, size: int, limit: int) -> tuple[int, int]:
        size = min(size, limit)
        low = max(0, min(low - (size - (high - low)) // 2, limit - size))
        return low, low + size

    box_w, box_h = right - left, bottom - top
    if box_w * height < box_h * width:  # too narrow: widen
        left, right = widen(left, right, math.ceil(box_h * width / height), image_w)
    else:  # too flat: heighten
        top, bottom = widen(top, bottom, math.ceil(box_w * height / width), image_h)
    return left, top, right, bottom


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fill_masked(image, mask: np.ndarray):
    """AUTOMATIC1111's "fill": the masked area painted with the colours around it, from wide to narrow blurs.

    The kept pixels (mask 0), blurred with decreasing radii, are layered over each other, each
    layer's alpha being how much kept area its blur reached; the kept pixels themselves go on top.
    """
    from PIL import Image, ImageFilter

    keep = Image.fromarray(((1 - mask[0]) * 255).astype(np.uint8), "L")
    kept = image.convert("RGBA")
    kept.putalpha(keep)
    premultiplied = kept.convert("RGBa")  # blur colour weighted by alpha, so the masked area adds nothing
    result = Image.new("RGBA", image.size)
    for radius, layers in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = (premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied).convert("RGBA")
        for _ in range(layers):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def paste_outside_mask(images: np.ndarray, request: Img2ImgRequest) -> np.ndarray:
    """AUTOMATIC1111's overlay: the init image over each result, opaque where the blurred mask keeps it."""
    from build.imaging import resized_rgb

    original = np.asarray(resized_rgb(request.init_image, request.width, request.height), dtype=np.float32)
    repaint = np.asarray(soft_mask(request.mask, request.width, request.height, request.mask_blur,
                                   request.inpainting_mask_invert), dtype=np.float32)[..., None] / np.float32(255)
    blended = images.astype(np.float32) * repaint + original[None] * (1 - repaint)
    return np.round(blended).astype(np.uint8)


def canny(image, low: int, high: int):
    """Canny edges (white on black, 3 channels) of an RGB image; thresholds on 0-255 intensities.

    scikit-image's Canny (Gaussian sigma 1, L2 gradient); OpenCV's, which sd-webui-controlnet uses,
    takes the L1 gradient, so edge maps differ slightly at the same thresholds.
    """
    from PIL import Image
    from skimage.feature import canny as skimage_canny

    gray = np.asarray(image.convert("L"), dtype=np.float64)
    edges = skimage_canny(gray, sigma=1.0, low_threshold=low, high_threshold=high)
    return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2))


def _control_scale(unit: ControlNetUnit | None, index: int, total: int) -> float:
    """diffusers' controlnet_keep: the unit acts on steps inside [guidance_start, guidance_end]."""
    if unit is None:
        return 0.0
    outside = index / total < unit.guidance_start or (index + 1) / total > unit.guidance_end
    return 0.0 if outside else float(unit.weight)


def _noise(shape: tuple, generator, variation: tuple[list[int], float] | None) -> "torch.Tensor":
    """The initial noise, drawn like diffusers'; with a variation seed, AUTOMATIC1111's slerp toward its noise."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(shape, generator=generator, dtype=torch.float32)
    if variation is None:
        return noise
    subseeds, strength = variation
    sub_generators = [torch.Generator().manual_seed(s) for s in subseeds]
    sub_noise = randn_tensor(shape, generator=sub_generators if len(subseeds) > 1 else sub_generators[0],
                             dtype=torch.float32)
    return torch.stack([slerp(strength, a, b) for a, b in zip(noise, sub_noise)])


def slerp(t: float, low: "torch.Tensor", high: "torch.Tensor") -> "torch.Tensor":
    """Spherical interpolation from `low` (t=0) to `high` (t=1), over the whole tensor; linear when nearly parallel."""
    import torch

    a, b = low.flatten(), high.flatten()
    dot = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    if dot > 0.9995:
        return (1 - t) * low + t * high
    omega = torch.acos(dot)
    return (torch.sin((1 - t) * omega) * low + torch.sin(t * omega) * high) / torch.sin(omega)


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    """What diffusers' pipelines pass to scheduler.step: eta and generator, where the scheduler takes them."""
    import inspect

    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
