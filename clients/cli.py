"""`kiln`: the project's one command line. Each subcommand is a thin main over an importable function."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from build.errors import KilnError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="Triton address host:port (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from build.sd import SD_VARIANTS
    from build.vit import DEFAULT_REPOSITORY, EXTRA_EXPORTS, VARIANTS

    parser = argparse.ArgumentParser(prog="kiln", description="Compiled-inference serving on Triton: build, serve, call, measure.")
    commands = parser.add_subparsers(dest="command", required=True)

    # kiln build vit
    build = commands.add_parser("build", help="export and compile models into a Triton model repository")
    targets = build.add_subparsers(dest="target", required=True)
    vit = targets.add_parser("vit", help=f"ViT-B/16 classifier ({', '.join(VARIANTS)})")
    source = vit.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="local timm/HF folder, .safetensors file, or hub id (needs network)")
    source.add_argument("--random-weights", action="store_true", help="the real architecture with seeded random weights")
    vit.add_argument("--seed", type=int, default=0, help="seed for --random-weights and calibration crops")
    vit.add_argument("--backend", choices=("onnxruntime", "openvino"), default="onnxruntime",
                     help="runtime of the served `vit` model")
    vit.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32",
                     help="precision of the served `vit` model")
    vit.add_argument("--variants", default="all",
                     help="comma-separated variants to build, 'all', or 'served' (only what is served)")
    vit.add_argument("--no-extra-exports", action="store_true",
                     help=f"skip the non-served exports ({', '.join(EXTRA_EXPORTS)})")
    vit.add_argument("--calibration", type=Path, help="folder of images for int8 calibration and parity checks")
    vit.add_argument("--calibration-size", type=int, default=32)
    vit.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write")
    vit.add_argument("--triton-backend", choices=("python", "native"), default="python",
                     help="python: runtimes inside Python-backend models (embedded Triton); "
                          "native: onnxruntime/openvino backends of NVIDIA's tritonserver image")
    vit.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="instance kind for native backends")
    vit.add_argument("--threads", type=int, default=0, help="runtime threads inside Triton (0: all cores)")

    sd = targets.add_parser("sd", help="Stable Diffusion 1.x: text encoder, UNet, VAE decoder + tokenizer (txt2img)")
    sd.add_argument("--weights", required=True,
                    help="diffusers-format folder (see `kiln weights sd`), a single-file SD 1.x .safetensors "
                         "(AUTOMATIC1111's layout), or a hub id")
    sd.add_argument("--config", help="a single file's architecture: a diffusers-format folder whose configs describe "
                                     "it (default: SD 1.5's, with the UNet's input channels read from the file)")
    sd.add_argument("--controlnet", action="append", metavar="[NAME=]PATH",
                    help="a ControlNet folder, single .safetensors file or hub id; repeat for several, each served "
                         "as its own model that requests pick by NAME (default: the folder's or file's name; the first "
                         "is the default ControlNet). Default: <weights>/controlnet when present")
    sd.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write")
    sd.add_argument("--min-size", type=int, default=64, help="smallest image side the build serves (pixels)")
    sd.add_argument("--opt-size", type=int, default=512)
    sd.add_argument("--max-size", type=int, default=1024, help="largest image side the build serves (pixels)")
    sd.add_argument("--threads", type=int, default=0, help="runtime threads inside Triton (0: all cores)")
    sd.add_argument("--variant", default="onnxruntime-fp32",
                    choices=tuple(SD_VARIANTS),
                    help="what the served models run: each is derived from the fp32 ONNX export and checked against "
                         "PyTorch; lower precisions also report an image's PSNR against fp32 (default: %(default)s)")

    # kiln weights
    weights = commands.add_parser("weights", help="write seeded random checkpoints of the real architectures")
    weight_targets = weights.add_subparsers(dest="target", required=True)
    sd = weight_targets.add_parser("sd", help="a diffusers-format Stable Diffusion 1.x folder (+ ControlNet)")
    size = sd.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", type=Path, metavar="OUT", help="tiny components (diffusers' test sizes), seconds to run")
    size.add_argument("--full-size-random", type=Path, metavar="OUT", help="SD 1.5's architecture (UNet 859.5 M parameters)")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--no-controlnet", action="store_true")
    sd.add_argument("--inpainting", action="store_true", help="a 9-channel inpainting UNet (as SD 1.5 inpainting)")
    sd.add_argument("--single-file", type=Path, metavar="FILE.safetensors",
                    help="also write the checkpoint as one original-layout .safetensors (what AUTOMATIC1111 loads)")
    vit_weights = weight_targets.add_parser("vit", help="a timm-style ViT-B/16 folder (model.safetensors + config.json)")
    vit_weights.add_argument("--random", type=Path, metavar="OUT", required=True)
    vit_weights.add_argument("--seed", type=int, default=0)

    # kiln serve
    serve = commands.add_parser("serve", help="start Triton and the API (AUTOMATIC1111-compatible, port 7860); "
                                              "Ctrl-C / SIGTERM drains and stops")
    serve.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    serve.add_argument("--address", default="127.0.0.1", help="Triton's bind address (default: loopback only)")
    serve.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port")
    serve.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    serve.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port")
    serve.add_argument("--log-verbose", type=int, default=0)
    serve.add_argument("--triton-url", help="use this running Triton (host:gRPC port) instead of starting one")
    api = serve.add_argument_group("API service")
    api.add_argument("--no-api", action="store_true", help="serve Triton only")
    api.add_argument("--listen", default="127.0.0.1", help="API bind address (any but loopback needs --api-auth or --api-keys)")
    api.add_argument("--port", type=int, default=7860, help="API port")
    api.add_argument("--api-auth", help="HTTP Basic credentials user:pass[,user:pass]")
    api.add_argument("--api-keys", help="comma-separated API keys (X-API-Key or Authorization: Bearer)")
    api.add_argument("--rate-limit", type=float, default=0.0, help="requests per minute per client (0: none)")
    api.add_argument("--cors-origins", default="", help="comma-separated allowed origins (default: CORS closed)")
    api.add_argument("--queue-size", type=int, default=64, help="jobs waiting beyond the running ones; more is 429")
    api.add_argument("--workers", type=int, default=16, help="generations running at once")
    api.add_argument("--no-step-batching", action="store_true", help="do not merge UNet steps across requests")
    api.add_argument("--max-batch-rows", type=int, default=0, help="rows per merged UNet call (0: the model's max)")
    api.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a generation is a 504")
    api.add_argument("--max-steps", type=int, default=150, help="most sampling steps a request may ask for")

    # kiln classify / embed
    classify = commands.add_parser("classify", help="top-k ImageNet labels for images, through vit_classify")
    classify.add_argument("images", nargs="+")
    _add_server_args(classify)
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("--json", action="store_true", help="print JSON instead of a table")

    embed = commands.add_parser("embed", help="ViT features for images, through vit_embed")
    embed.add_argument("images", nargs="+")
    _add_server_args(embed)
    embed.add_argument("--layer", type=int, default=-1, help="block whose tokens to return: 0..11, or -1 for the last")
    embed.add_argument("--tokens", choices=("cls", "all"), default="cls",
                       help="cls: the pooled 768-d CLS embedding; all: also the 197x768 tokens of --layer")
    embed.add_argument("--json", action="store_true", help="print JSON with the values")
    embed.add_argument("--out", type=Path, help="also save each result as .npy files in this folder")

    # kiln generate
    generate = commands.add_parser("generate", help="txt2img through Triton (needs `kiln build sd` and `kiln serve`)")
    generate.add_argument("prompt")
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--steps", type=int, default=20)
    generate.add_argument("--sampler", default="Euler a")
    generate.add_argument("--cfg-scale", type=float, default=7.0)
    generate.add_argument("--seed", type=int, default=-1, help="-1: random (the seed used is printed)")
    generate.add_argument("--width", type=int, default=512)
    generate.add_argument("--height", type=int, default=512)
    generate.add_argument("--batch-size", type=int, default=1)
    generate.add_argument("--init-image", type=Path, help="img2img: start from this image (resized to --width x --height)")
    generate.add_argument("--strength", type=float, default=0.75, help="img2img denoising strength in [0, 1]")
    generate.add_argument("--mask", type=Path, help="inpainting (with --init-image): white repaints, black keeps")
    generate.add_argument("--mask-blur", type=int, default=4, help="Gaussian blur radius of the mask")
    generate.add_argument("--mask-invert", action="store_true", help="repaint the black part instead")
    generate.add_argument("--inpainting-fill", type=int, choices=(0, 1, 2, 3), default=1,
                          help="what the masked area starts from: 0 fill, 1 original (default), 2 latent noise, "
                               "3 latent nothing")
    generate.add_argument("--only-masked", action="store_true",
                          help="inpaint a crop around the mask at --width x --height and paste it back "
                               "(AUTOMATIC1111's inpaint_full_res); the image keeps its own size")
    generate.add_argument("--only-masked-padding", type=int, default=32, help="pixels around the mask's crop")
    generate.add_argument("--overlay", action="store_true",
                          help="paste the init image back outside the blurred mask (what AUTOMATIC1111 returns)")
    generate.add_argument("--control-image", type=Path, action="append",
                          help="ControlNet: a control image (or a photo with --control-module canny); repeat it for "
                               "several units, whose residuals add up. The other --control-* options take one value "
                               "for all units or one per unit")
    generate.add_argument("--control-module", choices=("none", "canny"), action="append")
    generate.add_argument("--control-model", action="append",
                          help="which of the build's ControlNets the unit uses, by name (default: the first built)")
    generate.add_argument("--control-weight", type=float, action="append", help="ControlNet conditioning scale (1)")
    generate.add_argument("--control-start", type=float, action="append",
                          help="fraction of steps where ControlNet starts (0)")
    generate.add_argument("--control-end", type=float, action="append", help="fraction of steps where ControlNet stops (1)")
    generate.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (the loop runs here)")
    generate.add_argument("--api", metavar="URL", help="go through the API service instead, e.g. http://127.0.0.1:7860")
    generate.add_argument("--api-auth", help="user:password for --api (HTTP Basic)")
    generate.add_argument("--api-key", help="API key for --api")
    generate.add_argument("--out", type=Path, default=Path("out.png"), help="PNG path; a batch adds -1, -2, ...")

    # kiln demo
    demo = commands.add_parser("demo", help="build, serve, classify and embed the sample images, stop")
    demo.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    demo.add_argument("--out", type=Path, default=PROJECT_ROOT / "out" / "demo")

    # kiln bench vit
    bench = commands.add_parser("bench", help="benchmarks (see benchmarks/)")
    bench_targets = bench.add_subparsers(dest="target", required=True)
    bench_vit = bench_targets.add_parser("vit", help="images/s and latency: torch eager vs runtimes, direct vs Triton")
    bench_vit.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    bench_vit.add_argument("--variants", default="onnxruntime-fp32,onnxruntime-int8,openvino-fp32,openvino-bf16,openvino-int8")
    bench_vit.add_argument("--batch-sizes", type=_int_list, default=(1, 8), help="comma-separated, e.g. 1,8")
    bench_vit.add_argument("--seconds", type=float, default=8.0, help="measuring time per configuration")
    bench_vit.add_argument("--skip-build", action="store_true", help="reuse the variants already in --repo")
    bench_serve = bench_targets.add_parser("serve", help="concurrent txt2img clients against the API: "
                                                         "step-level batching on vs off")
    bench_serve.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    bench_serve.add_argument("--pipeline", choices=("tiny", "full"), default="tiny",
                             help="tiny random SD, or SD 1.5's full-size architecture (slow: hours on 2 cores)")
    bench_serve.add_argument("--clients", type=_int_list, default=(1, 2, 4, 8, 16), help="concurrency levels")
    bench_serve.add_argument("--requests-per-client", type=int, default=3)
    bench_serve.add_argument("--steps", type=int, default=20)
    bench_serve.add_argument("--size", type=int, default=0, help="image side (default: 64 tiny, 512 full)")
    bench_serve.add_argument("--skip-build", action="store_true", help="reuse the benchmark's repository")
    bench_sd = bench_targets.add_parser("sd", help="SD per component and per image: torch eager vs ONNX Runtime "
                                                   "and OpenVINO variants, direct vs Triton")
    bench_sd.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    bench_sd.add_argument("--pipeline", choices=("tiny", "full"), default="full",
                          help="SD 1.5's full-size architecture with seeded random weights (default), or the tiny one")
    bench_sd.add_argument("--size", type=int, default=0, help="image side (default: 512 full, 64 tiny)")
    bench_sd.add_argument("--steps", type=int, default=20, help="steps of the measured images")
    bench_sd.add_argument("--repeats", type=int, default=3, help="timed calls per component after one warm-up")
    bench_sd.add_argument("--variants", default="torch-fp32,onnxruntime-fp32,openvino-fp32,openvino-bf16,openvino-int8",
                          help="comma-separated; also onnxruntime-int8, openvino-fp16, openvino-int8-hybrid")
    bench_sd.add_argument("--no-triton", action="store_true", help="skip the run through Triton + the orchestrator")
    bench_sd.add_argument("--skip-build", action="store_true",
                          help="reuse the benchmark's checkpoint, repository and derived artifacts")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = {"build": cmd_build, "weights": cmd_weights, "generate": cmd_generate, "serve": cmd_serve, "classify": cmd_classify, "embed": cmd_embed,
                   "demo": cmd_demo, "bench": cmd_bench}[args.command]
        return handler(args) or 0
    except KilnError as exc:
        print(f"kiln {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return 130


# -- subcommands --------------------------------------------------------------------------------

def cmd_build(args) -> int:
    if args.target == "sd":
        from build.sd import ImageRange, SDBuildOptions, build_sd

        build_sd(SDBuildOptions(weights=args.weights, controlnet=tuple(args.controlnet or ()) or None,
                                config=args.config, repository=args.repo,
                                images=ImageRange(args.min_size, args.opt_size, args.max_size), threads=args.threads,
                                variant=args.variant))
        return 0
    from build.vit import EXTRA_EXPORTS, ViTBuildOptions, build_vit

    if args.variants == "all":
        variants = None
    elif args.variants == "served":
        variants = ()
    else:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    options = ViTBuildOptions(
        weights=args.weights, random_weights=args.random_weights, seed=args.seed, backend=args.backend,
        precision=args.precision, variants=variants, extra_exports=() if args.no_extra_exports else EXTRA_EXPORTS,
        calibration=args.calibration, calibration_size=args.calibration_size, repository=args.repo,
        triton_backend=args.triton_backend, instance_kind="KIND_GPU" if args.device == "gpu" else "KIND_CPU",
        threads=args.threads,
    )
    result = build_vit(options)
    print(f"served: vit = {result.served.key} ({result.served.artifact})")
    return 0


def cmd_generate(args) -> int:
    from orchestrator.diffusion import ControlNetUnit, Img2ImgRequest, TritonDiffusion, Txt2ImgRequest
    from orchestrator.images import save_png

    if args.mask is not None and args.init_image is None:
        raise KilnError("--mask needs --init-image (inpainting repaints part of an image)")
    for path in (args.init_image, *(args.control_image or ()), args.mask):
        if path is not None and not path.is_file():
            raise KilnError(f"{path}: no such image file")
    images = args.control_image or []

    def per_unit(name: str, default) -> list:
        values = getattr(args, name) or [default]
        if len(values) not in (1, len(images)):
            raise KilnError(f"--{name.replace('_', '-')} was given {len(values)} times for {len(images)} "
                            "--control-image units: give it once (for all) or once per unit")
        return values * len(images) if len(values) == 1 else values

    settings = zip(per_unit("control_module", "none"), per_unit("control_weight", 1.0),
                   per_unit("control_start", 0.0), per_unit("control_end", 1.0), per_unit("control_model", None))
    unit = tuple(ControlNetUnit(image=path.read_bytes(), module=module, weight=weight, guidance_start=start,
                                guidance_end=end, model=model)
                 for path, (module, weight, start, end, model) in zip(images, settings)) or None
    fields = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
                  cfg_scale=args.cfg_scale, seed=args.seed, width=args.width, height=args.height,
                  batch_size=args.batch_size, controlnet=unit)
    if args.init_image is not None:
        request = Img2ImgRequest(**fields, init_image=args.init_image.read_bytes(), denoising_strength=args.strength,
                                 mask=args.mask.read_bytes() if args.mask else b"", mask_blur=args.mask_blur,
                                 inpainting_mask_invert=args.mask_invert, inpainting_fill=args.inpainting_fill,
                                 inpaint_full_res=args.only_masked, inpaint_full_res_padding=args.only_masked_padding,
                                 overlay=args.overlay)
    else:
        request = Txt2ImgRequest(**fields)
    if args.api:
        from clients.api import generate_via_api

        return generate_via_api(args.api, request, args.out, auth=args.api_auth, api_key=args.api_key)
    pipeline = TritonDiffusion(args.url)

    def progress(step, total, _latents):
        print(f"\rstep {step}/{total}", end="", file=sys.stderr, flush=True)

    run = pipeline.img2img if args.init_image is not None else pipeline.txt2img
    result = run(request, progress=progress)
    print(file=sys.stderr)
    for index, (image, seed) in enumerate(zip(result.images, result.seeds)):
        path = args.out if len(result.images) == 1 else args.out.with_name(f"{args.out.stem}-{index + 1}{args.out.suffix}")
        save_png(image, path, result.info | {"seed": seed})
        print(f"wrote {path} (seed {seed})")
    return 0


def cmd_weights(args) -> int:
    if args.target == "sd":
        from build.sd_weights import write_sd_checkpoint

        out, size = (args.tiny, "tiny") if args.tiny else (args.full_size_random, "full")
        if args.single_file is not None and args.single_file.suffix != ".safetensors":
            raise KilnError(f"--single-file {args.single_file}: the file name must end in .safetensors")
        write_sd_checkpoint(out, size=size, seed=args.seed, controlnet=not args.no_controlnet,
                            inpainting=args.inpainting)
        if args.single_file is not None:
            from build.sd_single_file import write_single_file

            print(f"wrote {write_single_file(out, args.single_file)} (original layout; ControlNet stays in {out}/controlnet)")
    else:
        from build.weights import load_vit, save_vit_checkpoint

        out = save_vit_checkpoint(load_vit(random_weights=True, seed=args.seed).model, args.random)
    print(f"wrote seeded random weights (seed {args.seed}) to {out}: the real architecture, meaningless outputs")
    return 0


def serve_settings(args):
    """The API settings `kiln serve` flags describe (validated before anything starts)."""
    from orchestrator.api import Settings
    from orchestrator.security import SecurityOptions, parse_credentials
    from orchestrator.service import check_exposure

    for name in ("queue_size", "workers", "port", "max_steps"):
        if getattr(args, name) < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate_limit < 0 or args.request_timeout <= 0 or args.max_batch_rows < 0:
        raise KilnError("--rate-limit and --max-batch-rows must be >= 0, --request-timeout > 0")
    keys = tuple(k.strip() for k in (args.api_keys or "").split(",") if k.strip())
    security = SecurityOptions(credentials=tuple(parse_credentials(args.api_auth)), api_keys=keys,
                               rate_limit_per_minute=args.rate_limit)
    triton = args.triton_url or f"{'127.0.0.1' if args.address in ('0.0.0.0', '') else args.address}:{args.grpc_port}"
    settings = Settings(triton_url=triton, max_queue=args.queue_size, workers=args.workers,
                        step_batching=not args.no_step_batching, max_batch_rows=args.max_batch_rows,
                        request_timeout_s=args.request_timeout, max_steps=args.max_steps,
                        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
                        security=security, listen=args.listen, port=args.port)
    check_exposure(settings)
    return settings


def cmd_serve(args) -> int:
    from orchestrator.triton_server import TritonOptions, TritonServer

    settings = None if args.no_api else serve_settings(args)
    if args.triton_url:
        if settings is None:
            raise KilnError("--triton-url with --no-api leaves nothing to serve")
        return _serve_api(settings, None)
    server = TritonServer(TritonOptions(repository=args.repo, address=args.address, http_port=args.http_port,
                                        grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                                        log_verbose=args.log_verbose))
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    print(f"starting Triton on {args.address} (repository {args.repo}) ...", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()  # Ctrl-C or SIGTERM while models load: stop the half-started server
    except KeyboardInterrupt:
        server.stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"Triton ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}", flush=True)
    print(f"Triton log: {server.log_path}", flush=True)
    if settings is not None:
        return _serve_api(settings, server)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("Ctrl-C stops", flush=True)
    try:
        while not stop.wait(0.5):
            if not server.is_running():
                raise KilnError(f"tritonserver exited unexpectedly:\n{server.explain()}")
    finally:
        code = server.stop()
        print(f"Triton stopped (exit code {code})", flush=True)
    return 0


def _serve_api(settings, triton) -> int:
    """uvicorn until SIGINT/SIGTERM (it drains open requests), then Triton is stopped."""
    from orchestrator.service import run_api

    def started():
        print(f"API ready: http://{settings.listen}:{settings.port}  (docs /docs, AUTOMATIC1111 /sdapi/v1, "
              f"tasks /v1/tasks, metrics /metrics); Ctrl-C or SIGTERM drains and stops", flush=True)

    try:
        run_api(settings, on_started=started)
    finally:
        if triton is not None:
            code = triton.stop()
            print(f"Triton stopped (exit code {code})", flush=True)
    return 0


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def cmd_classify(args) -> int:
    from clients.vit import ViTClient, print_classifications, read_images

    client = ViTClient(args.url, args.protocol)
    results = client.classify(read_images(args.images), top_k=args.top_k)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print_classifications(results)
    return 1 if any(r.error for r in results) else 0


def cmd_embed(args) -> int:
    import numpy as np

    from clients.vit import ViTClient, read_images

    client = ViTClient(args.url, args.protocol)
    results = client.embed(read_images(args.images), layer=args.layer, tokens=args.tokens == "all")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for index, r in enumerate(results):
            if r.error is None:
                stem = f"{index:03d}-{Path(r.image).stem}"  # the index keeps a/x.jpg and b/x.png apart
                np.save(args.out / f"{stem}.embedding.npy", r.embedding)
                if r.tokens is not None:
                    np.save(args.out / f"{stem}.tokens.layer{r.layer}.npy", r.tokens)
    if args.json:
        print(json.dumps([r.as_dict() for r in results]))
    else:
        for r in results:
            if r.error:
                print(f"{r.image}\n  error: {r.error}")
                continue
            line = f"{r.image}\n  embedding (768): norm {np.linalg.norm(r.embedding):.4f}  first {np.round(r.embedding[:4], 4).tolist()}"
            if r.tokens is not None:
                line += f"\n  tokens of block {r.layer}: {tuple(r.tokens.shape)}"
            print(line)
    return 1 if any(r.error for r in results) else 0


def cmd_demo(args) -> int:
    from clients.demo import run_demo

    return run_demo(repository=args.repo, out=args.out)


def cmd_bench(args) -> int:
    if args.target == "sd":
        from benchmarks.sd import SDBenchOptions, run_sd_benchmark

        run_sd_benchmark(SDBenchOptions(
            out=args.out, pipeline=args.pipeline, size=args.size, steps=args.steps, repeats=args.repeats,
            variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()), triton=not args.no_triton,
            skip_build=args.skip_build))
        return 0
    if args.target == "serve":
        from benchmarks.serve import ServeBenchOptions, run_serve_benchmark

        run_serve_benchmark(ServeBenchOptions(out=args.out, pipeline=args.pipeline, concurrency=args.clients,
                                              requests_per_client=args.requests_per_client, steps=args.steps,
                                              skip_build=args.skip_build, size=args.size))
        return 0
    from benchmarks.vit import BenchOptions, run_benchmark

    options = BenchOptions(
        out=args.out,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        batch_sizes=args.batch_sizes,
        seconds=args.seconds, skip_build=args.skip_build,
    )
    run_benchmark(options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
