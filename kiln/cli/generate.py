"""`kiln generate`: txt2img, img2img, inpainting and ControlNet, through Triton (the loop runs here) or through
the API service (`--api URL`)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from kiln.errors import KilnError
from kiln.preprocessors import CONTROL_MODULES

VAE_TILING = {"auto": None, "on": True, "off": False}  # --vae-tiling -> a request's vae_tiling
PAD_SETTINGS = {"empty_chunks": "pad_cond_uncond", "last_vector": "pad_cond_uncond_v0"}  # --pad-conds -> a setting


# The inpainting options' defaults (the flags' own are False): set away from them without --mask, they are refused
INPAINTING_DEFAULTS = {"mask_blur": 4, "inpainting_fill": 1, "only_masked_padding": 32, "inpainting_mask_weight": 1.0}


def add_parser(commands) -> None:
    generate = commands.add_parser("generate", help="txt2img/img2img through Triton (needs `kiln build sd` and "
                                                    "`kiln serve`), or through the API with --api")
    generate.add_argument("prompt")
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--steps", type=int, default=20)
    generate.add_argument("--sampler", default="Euler a")
    generate.add_argument("--cfg-scale", type=float, default=7.0)
    generate.add_argument("--seed", type=int, default=-1, help="-1: random (the seed used is printed)")
    generate.add_argument("--subseed", type=int, default=-1,
                          help="AUTOMATIC1111's variation seed: its noise mixed in by --subseed-strength")
    generate.add_argument("--subseed-strength", type=float, default=0.0, help="0: the seed's noise; 1: the subseed's")
    generate.add_argument("--seed-resize-from", type=_size, metavar="WxH",
                          help="AUTOMATIC1111's Resize seed from: the noise the seed gives at WxH, at the centre")
    generate.add_argument("--ensd", type=int, default=0, metavar="N",
                          help="AUTOMATIC1111's eta noise seed delta: the samplers' own noise from seed + N")
    generate.add_argument("--rng", choices=("CPU", "GPU", "NV"),
                          help="AUTOMATIC1111's random number source: CPU (default directly: diffusers' noise), GPU "
                               "(its default) or NV: the numbers an NVIDIA GPU draws, on any machine; with --api, "
                               "default: the server's randn_source option")
    generate.add_argument("--width", type=int, default=512)
    generate.add_argument("--height", type=int, default=512)
    generate.add_argument("--batch-size", type=int, default=1)
    generate.add_argument("--clip-skip", type=int, default=1,
                          help="AUTOMATIC1111's clip skip (CLIP_stop_at_last_layers): 1 uses the text encoder's last "
                               "layer, 2 the one before, ...")
    generate.add_argument("--pad-conds", choices=("off", "empty_chunks", "last_vector"), default="off",
                          help="a negative prompt and a prompt of different lengths: off (AUTOMATIC1111's default: a "
                               "UNet call each), empty_chunks (its Pad conds) or last_vector (Pad conds v0): one call")
    generate.add_argument("--old-scheduling", action="store_true",
                          help="AUTOMATIC1111's old prompt editing timelines (use_old_scheduling, before 1.8)")
    generate.add_argument("--vae", help="one of the build's other VAEs by name (kiln build sd --vae; AUTOMATIC1111's "
                                        "sd_vae); default: the checkpoint's own")
    generate.add_argument("--tiling", action="store_true",
                          help="seamless images: the build's circular-padding models (kiln build sd --tiling)")
    generate.add_argument("--vae-tiling", choices=("auto", "on", "off"), default="auto",
                          help="decode (and encode) in VAE tiles, as diffusers' enable_vae_tiling: on, off, or auto "
                               "(above 1024x1024 pixels, or the server's --vae-tile-above)")
    generate.add_argument("--hires", type=float, metavar="SCALE",
                          help="AUTOMATIC1111's hires fix: upscale the result by SCALE and redraw it (img2img)")
    generate.add_argument("--hires-upscaler", default="Latent",
                          help="Latent, Latent (bicubic), ... (a latent mode), or Lanczos / Nearest or an upscaler "
                               "network of the repository (kiln build upscaler) on the image")
    generate.add_argument("--hires-steps", type=int, default=0, help="steps of the hires pass (0: --steps)")
    generate.add_argument("--hires-strength", type=float, default=0.75, help="how much the hires pass redraws")
    generate.add_argument("--hires-first-pass", type=Path, metavar="IMAGE",
                          help="the hires fix of this image (--width x --height), which stands for the first pass: "
                               "only the hires pass runs (AUTOMATIC1111's firstpass_image)")
    generate.add_argument("--init-image", type=Path,
                          help="img2img: start from this image (resized to --width x --height)")
    generate.add_argument("--strength", type=float, default=0.75, help="img2img denoising strength in [0, 1]")
    generate.add_argument("--extra-noise", type=float, default=0.0,
                          help="AUTOMATIC1111's img2img_extra_noise: img2img's start (or the hires pass's) gets the "
                               "same noise again times this")
    generate.add_argument("--image-cfg-scale", type=float,
                          help="an instruct-pix2pix checkpoint's image guidance (AUTOMATIC1111's Image CFG scale, "
                               "its UI's 1.5): how closely the edit keeps to --init-image; unset or 1: none")
    generate.add_argument("--mask", type=Path, help="inpainting (with --init-image): white repaints, black keeps")
    generate.add_argument("--mask-blur", type=int, default=INPAINTING_DEFAULTS["mask_blur"],
                          help="Gaussian blur radius of the mask (OpenCV's, as AUTOMATIC1111's)")
    generate.add_argument("--mask-invert", action="store_true", help="repaint the black part instead")
    generate.add_argument("--soft-mask", action="store_true",
                          help="keep the mask soft where AUTOMATIC1111 rounds it by default (its mask_round false): "
                               "a transparent mask's alpha, the latent mask, an inpainting UNet's mask")
    generate.add_argument("--soft-inpainting", action="store_true",
                          help="AUTOMATIC1111's Soft inpainting: the mask's grey levels blend the init image in at "
                               "every step, and the result is composited with it where it changed little (the mask "
                               "kept soft, the composite pasted)")
    generate.add_argument("--soft-inpainting-settings", metavar="NAME=VALUE,...",
                          help="soft inpainting's settings (and soft inpainting on): schedule_bias (1), "
                               "preservation_strength (0.5), transition_contrast_boost (4), mask_influence (0), "
                               "difference_threshold (0.5), difference_contrast (2)")
    generate.add_argument("--inpainting-fill", type=int, choices=(0, 1, 2, 3),
                          default=INPAINTING_DEFAULTS["inpainting_fill"],
                          help="what the masked area starts from: 0 fill, 1 original (default), 2 latent noise, "
                               "3 latent nothing")
    generate.add_argument("--inpainting-mask-weight", type=float, default=INPAINTING_DEFAULTS["inpainting_mask_weight"],
                          help="a 9-channel inpainting UNet's masked image: how much of the masked area it hides "
                               "(AUTOMATIC1111's inpainting_mask_weight, Conditional mask weight; 0 to 1); without "
                               "--mask, img2img and the hires pass mask the whole image")
    generate.add_argument("--only-masked", action="store_true",
                          help="inpaint a crop around the mask at --width x --height and paste it back "
                               "(AUTOMATIC1111's inpaint_full_res); the image keeps its own size")
    generate.add_argument("--only-masked-padding", type=int, default=INPAINTING_DEFAULTS["only_masked_padding"],
                          help="pixels around the mask's crop")
    generate.add_argument("--overlay", action="store_true",
                          help="paste the init image back outside the blurred mask (what AUTOMATIC1111 returns; "
                               "the API always does)")
    generate.add_argument("--control-image", type=Path, action="append",
                          help="ControlNet: a control image (or a photo with --control-module canny); repeat it for "
                               "several units, whose residuals add up. The other --control-* options take one value "
                               "for all units or one per unit")
    generate.add_argument("--control-module", choices=CONTROL_MODULES, action="append",
                          help="the preprocessor run on the control image (sd-webui-controlnet's model-free modules)")
    generate.add_argument("--control-threshold-a", type=float, action="append",
                          help="the module's first slider (canny's low threshold, a blur's sigma, ...; default: the "
                               "module's; GET /controlnet/module_list lists them)")
    generate.add_argument("--control-threshold-b", type=float, action="append",
                          help="the module's second slider (canny's high threshold)")
    generate.add_argument("--control-model", action="append",
                          help="which of the build's ControlNets the unit uses, by name (default: the first built)")
    generate.add_argument("--control-weight", type=float, action="append", help="ControlNet conditioning scale (1)")
    generate.add_argument("--control-start", type=float, action="append",
                          help="fraction of steps where ControlNet starts (0)")
    generate.add_argument("--control-end", type=float, action="append",
                          help="fraction of steps where ControlNet stops (1)")
    generate.add_argument("--embeddings", type=Path, metavar="DIR",
                          help="textual-inversion embeddings (.safetensors) the prompts may name by file name "
                               "(default: embeddings/ in the working directory, where there is one); with --api, "
                               "the service's own folder is used (kiln serve --embeddings)")
    generate.add_argument("--loras", type=Path, metavar="DIR",
                          help="LoRA files the prompt's <lora:NAME:multiplier> tags name (default: loras/ in the "
                               "working directory, where there is one); Triton's models read the same files from "
                               "their KILN_LORAS folder (kiln serve --loras); with --api, the service's folder is used")
    generate.add_argument("--checkpoint", metavar="NAME",
                          help="the checkpoint to run, by name or title, where the repository holds several "
                               "(kiln build sd --checkpoint; AUTOMATIC1111's sd_model_checkpoint; default: the "
                               "repository's default checkpoint)")
    generate.add_argument("--refiner", metavar="NAME",
                          help="another served checkpoint that finishes the denoising (SDXL's refiner; "
                               "AUTOMATIC1111's refiner_checkpoint)")
    generate.add_argument("--refiner-switch-at", type=float, default=0.8, metavar="F",
                          help="when the refiner takes over: the share of the denoising done, 0-1 (default: 0.8)")
    generate.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (the loop runs here)")
    generate.add_argument("--api", metavar="URL", help="go through the API service instead, e.g. http://127.0.0.1:7860")
    generate.add_argument("--api-auth", help="user:password for --api (HTTP Basic)")
    generate.add_argument("--api-key", help="API key for --api")
    generate.add_argument("--out", type=Path, default=Path("out.png"), help="PNG path; a batch adds -1, -2, ...")
    generate.set_defaults(run=run)


def _size(text: str) -> tuple[int, int]:
    """WxH -> (width, height)."""
    import argparse

    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH (for example 512x512)")
    return int(width), int(height)


def _files(args) -> dict[str, bytes]:
    """Every image the arguments name, read once; a missing one is an error before anything runs."""
    if args.mask is not None and args.init_image is None:
        raise KilnError("--mask needs --init-image (inpainting repaints part of an image)")
    inpainting_only = [f"--{name.replace('_', '-')}" for name in ("mask_blur", "mask_invert", "soft_mask",
                                                                   "inpainting_fill", "only_masked",
                                                                   "only_masked_padding", "overlay", "soft_inpainting",
                                                                   "soft_inpainting_settings")
                       if getattr(args, name) not in (INPAINTING_DEFAULTS.get(name, False), None)]
    if inpainting_only and args.mask is None:  # they act on the mask: without one they would be ignored
        raise KilnError(f"{', '.join(inpainting_only)}: inpainting options; pass --mask (and --init-image) too")
    if args.image_cfg_scale is not None and args.init_image is None:
        raise KilnError("--image-cfg-scale guides an instruct-pix2pix edit of --init-image: pass --init-image too")
    if args.extra_noise and args.init_image is None and not args.hires:
        raise KilnError("--extra-noise is added to img2img's start or the hires pass's: pass --init-image or --hires")
    if args.hires and args.init_image is not None:
        raise KilnError("--hires is txt2img's hires fix; img2img (--init-image) has none")
    if args.hires_first_pass is not None and not args.hires:
        raise KilnError("--hires-first-pass is the hires fix's first pass: it needs --hires SCALE")
    files = {}
    for path in (args.init_image, *(args.control_image or ()), args.mask, args.hires_first_pass):
        if path is not None:
            if not path.is_file():
                raise KilnError(f"{path}: no such image file")
            files[str(path)] = path.read_bytes()
    return files


def _soft_inpainting(args):
    """--soft-inpainting's settings (orchestrator's SoftInpainting), or None without it."""
    from orchestrator.pipeline import SoftInpainting

    if not args.soft_inpainting and args.soft_inpainting_settings is None:
        return None
    given = {}
    for item in filter(None, (part.strip() for part in (args.soft_inpainting_settings or "").split(","))):
        name, _, value = (text.strip() for text in item.partition("="))
        if name not in SoftInpainting.__dataclass_fields__:
            raise KilnError(f"--soft-inpainting-settings: {name!r} is not one of its settings: "
                            f"{', '.join(SoftInpainting.__dataclass_fields__)}")
        try:  # as written: the infotext writes 1 as 1, not 1.0
            given[name] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise KilnError(f"--soft-inpainting-settings: {item!r} is not NAME=NUMBER") from None
    return SoftInpainting(**given)


def _units(args, files: dict[str, bytes]) -> list[dict]:
    """One dict per ControlNet unit: each --control-* option given once (for all) or once per unit."""
    images = args.control_image or []

    def per_unit(name: str, default) -> list:
        values = getattr(args, name) or [default]
        if len(values) not in (1, len(images)):
            raise KilnError(f"--{name.replace('_', '-')} was given {len(values)} times for {len(images)} "
                            "--control-image units: give it once (for all) or once per unit")
        return values * len(images) if len(values) == 1 else values

    columns = zip(per_unit("control_module", "none"), per_unit("control_weight", 1.0), per_unit("control_start", 0.0),
                  per_unit("control_end", 1.0), per_unit("control_model", None), per_unit("control_threshold_a", -1),
                  per_unit("control_threshold_b", -1))
    return [dict(image=files[str(path)], module=module, weight=weight, guidance_start=start, guidance_end=end,
                 model=model, threshold_a=a, threshold_b=b)
            for path, (module, weight, start, end, model, a, b) in zip(images, columns)]


def run(args) -> int:
    files = _files(args)
    units = _units(args, files)
    for name in ("embeddings", "loras"):
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            raise KilnError(f"--{name} {folder}: no such folder")
        if folder is not None and args.api:
            raise KilnError(f"--{name}: through --api the service reads its own folder (kiln serve --{name})")
    if args.api:
        return _through_api(args, files, units)
    from kiln.contract import DEFAULT_MODELS
    from kiln.embeddings import EmbeddingLibrary
    from kiln.imaging import encode_png
    from kiln.infotext import parameters_text
    from kiln.lora import LoraLibrary
    from kiln.triton_client import TritonClient
    from orchestrator.pipeline import ControlNetUnit, HiresFix, Img2ImgRequest, Pipeline, Refiner, Txt2ImgRequest
    from orchestrator.pipeline.components.triton import find_checkpoint, triton_components

    fields = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
                  cfg_scale=args.cfg_scale, seed=args.seed, subseed=args.subseed,
                  subseed_strength=args.subseed_strength, seed_resize_from=args.seed_resize_from,
                  eta_noise_seed_delta=args.ensd, width=args.width, height=args.height, batch_size=args.batch_size,
                  clip_skip=args.clip_skip, vae=args.vae, tiling=args.tiling,
                  vae_tiling=VAE_TILING[args.vae_tiling], pad_conds=args.pad_conds,
                  use_old_scheduling=args.old_scheduling, randn_source=args.rng or "CPU", extra_noise=args.extra_noise,
                  inpainting_mask_weight=args.inpainting_mask_weight,
                  controlnet=tuple(ControlNetUnit(**unit) for unit in units) or None,
                  refiner=Refiner(args.refiner, args.refiner_switch_at) if args.refiner else None)
    soft = _soft_inpainting(args)
    if args.init_image is not None:
        request = Img2ImgRequest(**fields, init_image=files[str(args.init_image)], denoising_strength=args.strength,
                                 mask=files.get(str(args.mask), b""), mask_blur=args.mask_blur,
                                 inpainting_mask_invert=args.mask_invert, inpainting_fill=args.inpainting_fill,
                                 mask_round=not (args.soft_mask or soft), inpaint_full_res=args.only_masked,
                                 inpaint_full_res_padding=args.only_masked_padding, soft_inpainting=soft,
                                 overlay=args.overlay or soft is not None, image_cfg_scale=args.image_cfg_scale)
    else:
        hires = HiresFix(scale=args.hires, upscaler=args.hires_upscaler, steps=args.hires_steps,
                         denoising_strength=args.hires_strength,
                         first_pass=files.get(str(args.hires_first_pass))) if args.hires else None
        request = Txt2ImgRequest(**fields, hires=hires)

    def progress(step, total, _latents):
        print(f"\rstep {step}/{total}", end="", file=sys.stderr, flush=True)

    embeddings = EmbeddingLibrary(args.embeddings or Path("embeddings"))
    loras = LoraLibrary(args.loras or Path("loras"))
    models, refiner = DEFAULT_MODELS, None
    if args.checkpoint or args.refiner:
        client = TritonClient(args.url, "grpc", timeout_s=30)
        try:
            models = find_checkpoint(client, args.checkpoint) if args.checkpoint else models
            refiner = find_checkpoint(client, args.refiner) if args.refiner else None
        finally:
            client.close()
    result = Pipeline(triton_components(args.url, embeddings=embeddings, loras=loras, models=models)).generate(
        request, progress=progress, refiner=None if refiner is None else Pipeline(triton_components(
            args.url, embeddings=embeddings, loras=loras, models=refiner)))
    print(file=sys.stderr)
    for index, (image, seed) in enumerate(zip(result.images, result.seeds)):
        path = args.out if len(result.images) == 1 else \
            args.out.with_name(f"{args.out.stem}-{index + 1}{args.out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(image, {"parameters": parameters_text(result.info | {"seed": seed})}))
        print(f"wrote {path} (seed {seed})")
    return 0


def _through_api(args, files: dict[str, bytes], units: list[dict]) -> int:
    """The same request as AUTOMATIC1111's JSON body, through the API service."""
    from pydantic import ValidationError

    from clients.api import APIClient, save_images
    from kiln import schemas

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    # eta as the direct path runs it (DDIM's 0), not the server's eta_ddim option; the other samplers' own default.
    # The sampler as named ("Uniform": the server's Automatic turns DPM++ 2M into DPM++ 2M Karras, as AUTOMATIC1111's)
    fields = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                  sampler_name=args.sampler, scheduler="Uniform", cfg_scale=args.cfg_scale, seed=args.seed,
                  width=args.width, height=args.height, batch_size=args.batch_size,
                  eta=0.0 if args.sampler.lower() == "ddim" else None,
                  subseed=args.subseed, subseed_strength=args.subseed_strength,
                  **(dict(zip(("seed_resize_from_w", "seed_resize_from_h"), args.seed_resize_from))
                     if args.seed_resize_from else {}),
                  tiling=args.tiling or None, vae_tiling=VAE_TILING[args.vae_tiling],
                  override_settings=({"CLIP_stop_at_last_layers": args.clip_skip} if args.clip_skip != 1 else {})
                  | ({"sd_vae": args.vae} if args.vae else {})
                  | ({PAD_SETTINGS[args.pad_conds]: True} if args.pad_conds != "off" else {})
                  | ({"sd_model_checkpoint": args.checkpoint} if args.checkpoint else {})
                  | ({"eta_noise_seed_delta": args.ensd} if args.ensd else {})
                  | ({"use_old_scheduling": True} if args.old_scheduling else {})
                  | ({"randn_source": args.rng} if args.rng else {})
                  | ({"img2img_extra_noise": args.extra_noise} if args.extra_noise else {})
                  | ({"inpainting_mask_weight": weight} if (weight := args.inpainting_mask_weight) != 1 else {}),
                  **({"refiner_checkpoint": args.refiner, "refiner_switch_at": args.refiner_switch_at}
                     if args.refiner else {}))
    if args.hires:
        fields |= dict(enable_hr=True, hr_scale=args.hires, hr_upscaler=args.hires_upscaler,
                       hr_second_pass_steps=args.hires_steps, denoising_strength=args.hires_strength)
        if args.hires_first_pass is not None:
            fields["firstpass_image"] = b64(files[str(args.hires_first_pass)])
    if units:
        fields["alwayson_scripts"] = {"controlnet": {"args": [
            {"enabled": True, "image": b64(u["image"]), "module": u["module"], "model": u["model"] or "None",
             "weight": u["weight"], "guidance_start": u["guidance_start"], "guidance_end": u["guidance_end"],
             "threshold_a": u["threshold_a"], "threshold_b": u["threshold_b"]}
            for u in units]}}
    if (soft := _soft_inpainting(args)) is not None:  # AUTOMATIC1111's always-on script, its args in its order
        fields["alwayson_scripts"] = fields.get("alwayson_scripts", {}) | {"soft inpainting": {"args": [
            True, *(getattr(soft, name) for name in soft.__dataclass_fields__)]}}
    if args.init_image is not None and args.mask is not None and not (args.overlay or soft):
        raise KilnError("--api: the API pastes the init image back outside the mask (AUTOMATIC1111 does); "
                        "pass --overlay to ask for that")
    try:
        if args.init_image is None:
            body = schemas.Txt2ImgBody(**fields)
        else:
            # Sent explicitly: the service's defaults are AUTOMATIC1111's (fill 0, only masked), not these options'.
            body = schemas.Img2ImgBody(**fields, init_images=[b64(files[str(args.init_image)])],
                                       denoising_strength=args.strength, mask_blur=args.mask_blur,
                                       inpainting_mask_invert=int(args.mask_invert), mask_round=not args.soft_mask,
                                       inpainting_fill=args.inpainting_fill, inpaint_full_res=args.only_masked,
                                       inpaint_full_res_padding=args.only_masked_padding,
                                       image_cfg_scale=args.image_cfg_scale,
                                       **({"mask": b64(files[str(args.mask)])} if args.mask else {}))
    except ValidationError as exc:  # what the server would refuse, named before anything is sent
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise KilnError(f"--api: {problems}") from None
    response = APIClient(args.api, auth=args.api_auth, api_key=args.api_key).generate(body, show_progress=True)
    for path, seed in save_images(response, args.out):
        print(f"wrote {path} (seed {seed})")
    return 0
