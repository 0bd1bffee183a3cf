"""`kiln weights sd|sdxl|vit|embedding|lora|vae|upscaler`: seeded random checkpoints of the real architectures (and a
textual-inversion embedding, a LoRA, another VAE and an upscaler for them), written as a user's would be."""

from __future__ import annotations

from pathlib import Path

from build.sd.families import FAMILIES, PREDICTIONS
from kiln.cli.args import above, at_least
from kiln.errors import KilnError

WRITES_EXTRAS = ("sd1", "sd2", "sdxl")  # the families kiln writes embeddings and LoRAs for (not SDXL's refiner)


def add_parser(commands) -> None:
    weights = commands.add_parser("weights", help="write seeded random checkpoints of the real architectures")
    targets = weights.add_subparsers(dest="target", required=True)
    sd = targets.add_parser("sd", help="a diffusers-format Stable Diffusion folder of any family (+ ControlNet)")
    _checkpoint_folder(sd, "tiny components (diffusers' test sizes), seconds to run",
                       "the released architecture (SD 1.5's UNet: 859.5 M parameters; SD 2.1's: 865.9 M)",
                       "a 9-channel inpainting UNet (as SD 1.5 inpainting)")
    _family(sd, tuple(FAMILIES))
    sd.add_argument("--instruct-pix2pix", action="store_true",
                    help="an 8-channel instruct-pix2pix UNet (latents + the edited image's), SD 1.x only: img2img "
                         "with image_cfg_scale")
    sd.add_argument("--prediction", choices=PREDICTIONS,
                    help="what the UNet predicts (default: the family's released model's: epsilon for SD 1.x, "
                         "v_prediction for SD 2.x, as SD 2.1 768; epsilon is SD 2.1-base's)")
    sd.set_defaults(run=run_sd)
    xl = targets.add_parser("sdxl", help="a diffusers-format SDXL base folder (same as `sd --family sdxl`)")
    _checkpoint_folder(xl, "tiny components (diffusers' SDXL test sizes), seconds to run",
                       "SDXL base 1.0's architecture (UNet 2,567.5 M parameters; text encoders 123.1 M + 694.7 M)",
                       "a 9-channel inpainting UNet (as SDXL inpainting 0.1)")
    xl.add_argument("--refiner", action="store_true",
                    help="SDXL's refiner instead (OpenCLIP ViT-bigG alone, aesthetic-score time ids; UNet 2,259.5 M)")
    xl.set_defaults(run=run_sd, family="sdxl", prediction=None, instruct_pix2pix=False)
    vit = targets.add_parser("vit", help="a timm-style ViT-B/16 folder (model.safetensors + config.json)")
    vit.add_argument("--random", type=Path, metavar="OUT", required=True)
    vit.add_argument("--seed", type=int, default=0)
    vit.add_argument("--tiny", action="store_true",
                     help="ViT-B/16's architecture 64 wide instead of 768 (config.json's model_args): every "
                          "variant builds in seconds")
    vit.set_defaults(run=run_vit)
    embedding = targets.add_parser("embedding", help="an AUTOMATIC1111 textual-inversion embedding (.safetensors, "
                                                     "emb_params) for the SD text encoder; its name is the file's")
    _file_sizes(embedding, "for `kiln weights sd --tiny`'s encoder", "for SD 1.5's (768 wide) or SD 2.x's (1024)")
    _family(embedding, WRITES_EXTRAS)
    embedding.add_argument("--vectors", type=int, default=2, help="vectors per use of its name (1-75)")
    embedding.add_argument("--seed", type=int, default=0)
    embedding.set_defaults(run=run_embedding)
    lora = targets.add_parser("lora", help="a LoRA in kohya's layout (.safetensors) for the SD UNet and text encoder; "
                                           "prompts use it as <lora:NAME:multiplier>, NAME the file's")
    _file_sizes(lora)
    _family(lora, WRITES_EXTRAS)
    lora.add_argument("--rank", type=at_least(1), default=4)
    lora.add_argument("--alpha", type=above(0), default=2.0,
                      help="kohya's alpha: the difference is scaled by alpha/rank")
    lora.add_argument("--unet-only", action="store_true", help="no text encoder layers")
    lora.add_argument("--seed", type=int, default=0)
    lora.set_defaults(run=run_lora)
    vae = targets.add_parser("vae", help="an SD VAE as AUTOMATIC1111's VAE files are (original layout, .safetensors); "
                                         "kiln build sd --vae serves it as sd_vae NAME, its file's name")
    _file_sizes(vae)
    vae.add_argument("--seed", type=int, default=7)
    vae.set_defaults(run=run_vae)
    upscaler = targets.add_parser("upscaler", help="an ESRGAN upscaler (x4, original ESRGAN key layout, as "
                                                   "AUTOMATIC1111's ESRGAN folder holds), tiny: seconds to build")
    upscaler.add_argument("--tiny", type=Path, metavar="OUT.safetensors", required=True)
    upscaler.add_argument("--seed", type=int, default=0)
    upscaler.set_defaults(run=run_upscaler)


def _file_sizes(parser, tiny: str = "for `kiln weights sd --tiny`", full: str = "for SD 1.5's architecture") -> None:
    """--tiny OUT or --full-size-random OUT: the architecture a written file is for (one of them required)."""
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", type=Path, metavar="OUT.safetensors", help=tiny)
    size.add_argument("--full-size-random", type=Path, metavar="OUT.safetensors", help=full)


def _checkpoint_folder(parser, tiny: str, full: str, inpainting: str) -> None:
    """What `weights sd` and `weights sdxl` share: --tiny OUT or --full-size-random OUT (one required), --seed,
    --no-controlnet, --inpainting, --single-file."""
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", type=Path, metavar="OUT", help=tiny)
    size.add_argument("--full-size-random", type=Path, metavar="OUT", help=full)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-controlnet", action="store_true")
    parser.add_argument("--inpainting", action="store_true", help=inpainting)
    parser.add_argument("--single-file", type=Path, metavar="FILE.safetensors",
                        help="also write the checkpoint as one original-layout .safetensors (what AUTOMATIC1111 "
                             "loads)")


def _family(parser, families: tuple[str, ...] = ("sd1", "sd2")) -> None:
    parser.add_argument("--family", choices=families, default="sd1",
                        help="the model family: sd1 (SD 1.x, CLIP ViT-L) or sd2 (SD 2.x, OpenCLIP ViT-H)"
                             + (", sdxl (two text encoders)" if "sdxl" in families else "") + " (default: %(default)s)")


def _sized(args) -> tuple[Path, str]:
    """The output path, and its architecture's size ("tiny" or "full"), of --tiny / --full-size-random."""
    return (args.tiny, "tiny") if args.tiny else (args.full_size_random, "full")


def run_sd(args) -> int:
    from build.sd.weights import write_sd_checkpoint

    out, size = _sized(args)
    if args.single_file is not None and args.single_file.suffix != ".safetensors":
        raise KilnError(f"--single-file {args.single_file}: the file name must end in .safetensors")
    family = "sdxl-refiner" if getattr(args, "refiner", False) else args.family
    if family == "sdxl-refiner" and args.single_file is not None:
        raise KilnError("--single-file: kiln writes SDXL refiners as diffusers folders only, not single files yet")
    write_sd_checkpoint(out, size=size, seed=args.seed, controlnet=not args.no_controlnet, inpainting=args.inpainting,
                        family_name=family, prediction=args.prediction, edit=args.instruct_pix2pix)
    if args.single_file is not None:
        from build.sd.single_file import write_single_file

        written = write_single_file(out, args.single_file)
        print(f"wrote {written} (original layout; ControlNet stays in {out}/controlnet)")
    print(f"wrote seeded random weights (seed {args.seed}) to {out}: the real architecture, meaningless outputs")
    return 0


def run_vit(args) -> int:
    from build.vit.weights import TINY_VIT_ARGS, write_random_vit

    out = write_random_vit(args.random, args.seed, args.tiny)
    print(f"wrote seeded random weights (seed {args.seed}) to {out}: the real architecture"
          f"{' (tiny: ' + str(TINY_VIT_ARGS) + ')' if args.tiny else ''}, meaningless outputs")
    return 0


def run_embedding(args) -> int:
    from build.sd.weights import random_embedding
    from kiln.embeddings import write_embedding

    out, size = _sized(args)
    if not 1 <= args.vectors <= 75:
        raise KilnError(f"--vectors {args.vectors}: an embedding has 1 to 75 vectors (one 75-token chunk)")
    vectors = random_embedding(size, args.vectors, args.seed, args.family)
    arch = FAMILIES[args.family].architecture(size)
    write_embedding(out, vectors, arch.text_encoder["hidden_size"] if arch.text_encoder_2 else 0)
    print(f"wrote {out}: {vectors.shape[0]} seeded random vectors (seed {args.seed}) of {vectors.shape[1]}; a prompt "
          f"uses it as the word {out.stem!r}")
    return 0


def run_lora(args) -> int:
    from build.sd.lora import random_lora, write_lora

    out, size = _sized(args)
    if out.suffix != ".safetensors":
        raise KilnError(f"{out}: a LoRA file's name must end in .safetensors")
    tensors = random_lora(size, args.seed, args.rank, args.alpha, text_encoder=not args.unet_only,
                          family_name=args.family)
    write_lora(out, tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(args.rank),
                              "ss_network_alpha": str(args.alpha), "ss_output_name": out.stem})
    layers = len([k for k in tensors if k.endswith(".alpha")])
    print(f"wrote {out}: {layers} seeded random layers (seed {args.seed}, rank {args.rank}, alpha {args.alpha}) in "
          f"kohya's layout; a prompt uses it as <lora:{out.stem}:1>")
    return 0


def run_vae(args) -> int:
    from build.sd.vae import random_vae, write_vae_file

    out, size = _sized(args)
    write_vae_file(random_vae(size, args.seed), out)
    print(f"wrote {out}: a seeded random VAE (seed {args.seed}) in the original layout; `kiln build sd --vae {out}` "
          f"serves it as sd_vae {out.name!r}")
    return 0


def run_upscaler(args) -> int:
    from safetensors.torch import save_file

    from build.upscaler import random_esrgan

    if args.tiny.suffix != ".safetensors":
        raise KilnError(f"{args.tiny}: the file's name must end in .safetensors")
    args.tiny.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_esrgan(args.seed), str(args.tiny))
    print(f"wrote {args.tiny}: a seeded random ESRGAN x4 (seed {args.seed}); `kiln build upscaler --weights "
          f"{args.tiny}` serves it as {args.tiny.stem!r}")
    return 0
