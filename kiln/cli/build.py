"""`kiln build vit|sd|upscaler`: export, compile and check models into a Triton model repository."""

from __future__ import annotations

from pathlib import Path

from kiln.cli.args import at_least, names
from kiln.errors import KilnError
from kiln.paths import DEFAULT_REPOSITORY


def add_parser(commands) -> None:
    from build.convert import SD_VARIANTS, VIT_VARIANTS

    build = commands.add_parser("build", help="export and compile models into a Triton model repository")
    targets = build.add_subparsers(dest="target", required=True)
    vit = targets.add_parser("vit", help=f"a timm ViT classifier, ViT-B/16 or yours ({', '.join(VIT_VARIANTS)})")
    source = vit.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="local timm/HF folder, .safetensors file, or hub id (needs network)")
    source.add_argument("--random-weights", action="store_true",
                        help="the real architecture with seeded random weights")
    vit.add_argument("--seed", type=int, default=0, help="seed for --random-weights and calibration crops")
    vit.add_argument("--backend", default="onnxruntime",
                     choices=("onnxruntime", "openvino", "torch", "torch-aoti", "onnxruntime-cuda",
                              "onnxruntime-tensorrt", "torch-cuda", "torch-aoti-cuda", "auto"),
                     help="runtime of the served `vit` model (torch: the torch.export program; torch-aoti: compiled "
                          "ahead of time by AOTInductor; -cuda, -tensorrt: fp16 on NVIDIA GPUs, with --device gpu "
                          "(onnxruntime's with --triton-backend native); auto: of the --variants built, the "
                          "fastest here whose parity is inside its tolerance, runtime and precision both)")
    vit.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"),
                     help="precision of the served `vit` model (default: fp32)")
    vit.add_argument("--variants", default="all",
                     help="comma-separated variants to build, 'all', or 'served' (only what is served)")
    vit.add_argument("--no-extra-exports", action="store_true",
                     help="skip the non-served exports (SafeTensors and TorchScript)")
    vit.add_argument("--calibration", type=Path, help="folder of images for int8 calibration and parity checks")
    vit.add_argument("--calibration-size", type=at_least(1), default=32)
    vit.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write")
    _target_arguments(vit)
    vit.add_argument("--threads", type=at_least(0), default=0,
                     help="runtime threads inside Triton (0: OMP_NUM_THREADS where the server sets it, else every "
                     "core it may use), and vit_preprocess's decode pool (0: every core)")
    vit.add_argument("--jpeg-draft", action="store_true",
                     help="vit_preprocess decodes a JPEG of at least twice the resize target at 1/2, 1/4 or 1/8 scale "
                          "(libjpeg's DCT scaling: a 12 MP photo's decode is several times faster), then resizes as "
                          "before; the pixels are close to timm's, not equal (the report gives the figures)")
    vit.add_argument("--decode", choices=("pil", "torch"), default="pil",
                     help="how vit_preprocess decodes JPEGs: pil (a pool of threads on the host) or torch "
                          "(torchvision's decode_jpeg on the device vit_preprocess runs on, nvJPEG on a GPU, resized "
                          "there and handed to vit there; needs the uint8 pixel wire). Its pixels are close to PIL's, "
                          "not equal: the report gives the figures")
    vit.add_argument("--pixel-wire", choices=("auto", "uint8", "float32"), default="auto",
                     help="how vit_preprocess hands images to vit: uint8 pixels, resized and cropped, which vit scales "
                          "(a quarter of the bytes; on a GPU, scaled there), or float32 pixel_values, scaled by the "
                          "decode pool (auto: uint8 with torch on a GPU, float32 otherwise). Either way `vit` "
                          "takes both, except on a native backend (float32 only)")
    vit.add_argument("--instances", type=at_least(0), default=0,
                     help="copies of the served vit model Triton runs (its instance_group count), each with its own "
                          "session; 0: auto, two on a GPU (one copy's copies and host work overlap the other's "
                          "compute), one on a CPU (one session uses every core: give more copies --threads)")
    vit.add_argument("--torch-compile", action="store_true",
                     help="torch-cuda-fp16: compile vit's program with torch.compile when Triton loads it (Inductor's "
                          "fused kernels, captured in its CUDA graphs); loading takes the compile's time longer. On "
                          "an H200 eager fp16 made 9,920 images/s at batch 256 in process, torch.compile 10,493 "
                          "(not yet measured served)")
    vit.set_defaults(run=run_vit)

    sd = targets.add_parser("sd", help="Stable Diffusion 1.x or 2.x: text encoder, UNet, VAE, ControlNets, tokenizer")
    sd.add_argument("--weights", required=True,
                    help="diffusers-format folder (see `kiln weights sd`), a single-file SD 1.x or 2.x .safetensors "
                         "(AUTOMATIC1111's layout), or a hub id")
    sd.add_argument("--config", help="a single file's architecture: a diffusers-format folder whose configs describe "
                                     "it (default: SD 1.5's or SD 2.1's, as the file's text encoder says, with the "
                                     "UNet's input channels read from the file)")
    sd.add_argument("--vae", action="append", metavar="[NAME=]PATH",
                    help="another VAE requests may choose (AUTOMATIC1111's sd_vae), built and checked like the "
                         "checkpoint's own: an original-layout .safetensors file (AUTOMATIC1111's VAE files), a "
                         "diffusers VAE folder, or a folder of .safetensors files; named by its file; repeatable")
    sd.add_argument("--tiling", action="store_true",
                    help="also serve the UNet and the VAE with circular padding, for AUTOMATIC1111's tiling (seamless "
                         "images): sd_unet_tiling, sd_vae_decoder_tiling, sd_vae_encoder_tiling")
    sd.add_argument("--controlnet", action="append", metavar="[NAME=]PATH",
                    help="a ControlNet folder, single .safetensors file or hub id; repeat for several, each served "
                         "as its own model that requests pick by NAME (default: the folder's or file's name; the first "
                         "is the default ControlNet). Default: <weights>/controlnet when present")
    sd.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write")
    sd.add_argument("--checkpoint", metavar="NAME", default="",
                    help="build into the repository beside its other checkpoints, as NAME (its models NAME--sd_*): "
                         "one kiln serve serves them all, and requests pick one by NAME in sd_model_checkpoint "
                         "(default: the repository's default checkpoint, named by its weights)")
    sd.add_argument("--min-size", type=at_least(1), default=64, help="smallest image side the build serves (pixels)")
    sd.add_argument("--opt-size", type=at_least(0), default=0,
                    help="the image side the profiles are tuned for (default: the checkpoint's own, 512 for SD 1.x, "
                         "768 for SD 2.x's v models)")
    sd.add_argument("--max-size", type=at_least(1), default=1024, help="largest image side the build serves (pixels)")
    sd.add_argument("--threads", type=at_least(0), default=0,
                    help="runtime threads inside Triton (0: OMP_NUM_THREADS where the server sets it, else every core)")
    sd.add_argument("--step-queue-delay-us", type=at_least(0), default=0,
                    help="how long the UNet and ControlNet models wait for batching partners (default: none; the "
                         "service's step batcher merges the steps of concurrent requests, a wait only slows each "
                         "step; raise it for clients that call sd_unet directly)")
    sd.add_argument("--layout", choices=("channels-last", "contiguous"), default="channels-last",
                    help="torch-cuda-fp16: the memory layout of the UNet's and ControlNets' convolution weights "
                         "(channels-last: NHWC, measured 1.18x faster at one request's 2 rows on an H200 and 6%% "
                         "slower at 16 merged rows; see benchmarks/RESULTS.md)")
    sd.add_argument("--torch-compile", action="store_true",
                    help="torch-cuda-fp16: compile the UNet's and ControlNets' programs with torch.compile when Triton "
                         "loads them (Inductor's fused kernels, captured in their CUDA graphs; calls no graph holds "
                         "run as exported); loading takes the compile's time longer. On an H200 the served UNet took "
                         "13.5 ms a step uncompiled; torch.compile with CUDA graphs took 7.9 ms in process (not yet "
                         "measured served)")
    _target_arguments(sd)
    sd.add_argument("--variant", default="onnxruntime-fp32", metavar="VARIANT[+PART=VARIANT...]",
                    help=f"what the served models run ({', '.join(SD_VARIANTS)}): each is checked against PyTorch; "
                         "lower precisions also report an image's PSNR against fp32; auto: the UNet timed in every "
                         "variant this machine can run (--auto-candidates), the fastest inside its tolerance served. "
                         "+text_encoder=VARIANT, +vae=VARIANT: that part runs another (openvino-int8-hybrid+vae="
                         "openvino-bf16: the UNet in int8, the VAE in bf16) (default: %(default)s)")
    sd.add_argument("--auto-candidates", help="comma-separated variants --variant auto times (default: every one "
                                              "this device can run here)")
    sd.set_defaults(run=run_sd)
    upscaler = targets.add_parser("upscaler", help="an upscaler network (ESRGAN family, read by spandrel) for the "
                                                   "extras, the hires fix and SD upscale")
    upscaler.add_argument("--weights", type=Path, required=True, metavar="FILE",
                          help=".safetensors or .pth (read weights-only: no code runs), e.g. 4x-UltraSharp.pth")
    upscaler.add_argument("--name", help="what requests call it (default: the file's name without its extension)")
    upscaler.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write")
    upscaler.add_argument("--threads", type=at_least(0), default=0,
                          help="runtime threads inside Triton (0: OMP_NUM_THREADS where the server sets it, else every "
                          "core)")
    upscaler.set_defaults(run=run_upscaler)


def _target_arguments(parser) -> None:
    parser.add_argument("--ov-device", default="CPU", metavar="CPU|GPU|NPU|AUTO",
                        help="OpenVINO variants: the device the served models compile for (GPU.1, AUTO:GPU,CPU too; "
                             "AUTO lets OpenVINO choose among what the serving machine has). Parity is checked on "
                             "this machine's CPU; a device it lacks is said in the report (default: CPU)")
    parser.add_argument("--static-size", action="append", metavar="SIZE",
                        help="OpenVINO variants: compile the served models at this fixed size, one image per call, "
                             "for devices that need static shapes (NPU): a side (512) or width x height (768x512); "
                             "repeat for more sizes. Requests at other sizes are refused (422 naming the built ones), "
                             "and prompts take one 75-token chunk (default: dynamic shapes)")
    parser.add_argument("--triton-backend", choices=("python", "native"), default="python",
                        help="python: the runtimes inside Python-backend models (the embedded Triton); native: the "
                             "onnxruntime/openvino backends of NVIDIA's tritonserver image (see the Dockerfile)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where the runtime models run (gpu: torch's CUDA variants, or ONNX Runtime's with "
                             "--triton-backend native)")


def _static_sizes(args) -> tuple[tuple[int, int], ...]:
    from build.static import parse_size

    return tuple(dict.fromkeys(parse_size(text) for text in args.static_size or ()))


def run_vit(args) -> int:
    from build.vit import EXTRA_EXPORTS, ViTBuildOptions, build_vit

    if args.backend == "auto" and args.precision:
        raise KilnError("--backend auto chooses the precision too: leave --precision out (--variants names the "
                        "candidates)")

    variants = {"all": None, "served": ()}.get(args.variants, names(args.variants))
    result = build_vit(ViTBuildOptions(
        weights=args.weights, random_weights=args.random_weights, seed=args.seed, backend=args.backend,
        precision=args.precision or "fp32", variants=variants,
        extra_exports=() if args.no_extra_exports else EXTRA_EXPORTS,
        calibration=args.calibration, calibration_size=args.calibration_size, repository=args.repo,
        triton_backend=args.triton_backend, device=args.device, ov_device=args.ov_device,
        static_sizes=_static_sizes(args), threads=args.threads, jpeg_draft=args.jpeg_draft,
        pixel_wire=args.pixel_wire, instances=args.instances, torch_compile=args.torch_compile, decode=args.decode))
    print(f"served: vit = {result.served_key} ({result.served.artifact})")
    return 0


def run_sd(args) -> int:
    from build.sd import ImageRange, SDBuildOptions, build_sd

    build_sd(SDBuildOptions(weights=args.weights, controlnet=tuple(args.controlnet or ()) or None, config=args.config,
                            vae=tuple(args.vae or ()), tiling=args.tiling,
                            repository=args.repo, images=ImageRange(args.min_size, args.opt_size, args.max_size),
                            checkpoint=args.checkpoint,
                            threads=args.threads, variant=args.variant, step_queue_delay_us=args.step_queue_delay_us,
                            channels_last=args.layout == "channels-last", torch_compile=args.torch_compile,
                            triton_backend=args.triton_backend, device=args.device, ov_device=args.ov_device,
                            static_sizes=_static_sizes(args),
                            auto_candidates=tuple(args.auto_candidates.split(",")) if args.auto_candidates else None))
    return 0


def run_upscaler(args) -> int:
    from build.upscaler import build_upscaler

    entry = build_upscaler(args.weights, args.repo, args.name, args.threads)
    print(f"served: {entry['model']} ({entry['architecture']} x{entry['scale']}); requests name it {entry['name']!r}")
    return 0
