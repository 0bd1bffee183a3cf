"""`kiln bench vit|serve|sd|edge|transport|vit-wire|preprocess`: the benchmarks (benchmarks/); results and commands in
benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from kiln.cli.args import at_least, int_list, names, size_list
from kiln.paths import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def add_parser(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks (see benchmarks/)")
    targets = bench.add_subparsers(dest="target", required=True)
    vit = targets.add_parser("vit", help="images/s and latency: torch eager vs runtimes, direct vs Triton")
    vit.add_argument("--out", type=Path, default=RESULTS)
    vit.add_argument("--variants",
                     default="onnxruntime-fp32,onnxruntime-int8,openvino-fp32,openvino-bf16,openvino-int8")
    vit.add_argument("--batch-sizes", type=int_list, default=(1, 8), help="comma-separated, e.g. 1,8")
    vit.add_argument("--seconds", type=at_least(0, float), default=8.0,
                     help="measuring time per configuration (0: three calls each)")
    vit.add_argument("--skip-build", action="store_true", help="reuse the variants already in --repo")
    vit.set_defaults(run=run_vit)
    serve = targets.add_parser("serve", help="concurrent txt2img clients against the API: step-level batching on "
                                             "vs off")
    _sd_pipeline(serve, "tiny", "tiny random SD, or SD 1.5's full-size architecture (slow: hours on 2 cores)")
    serve.add_argument("--clients", type=int_list, default=(1, 2, 4, 8, 16), help="concurrency levels")
    serve.add_argument("--requests-per-client", type=at_least(1), default=3)
    serve.add_argument("--steps", type=at_least(1), default=20)
    serve.add_argument("--skip-build", action="store_true", help="reuse the benchmark's repository")
    serve.add_argument("--replicas", type=int, default=1, choices=(1, 2),
                       help="2: one Triton against two behind the service at the same total cores, and the two "
                            "with the job store in Redis (kiln serve --redis; a redis-server on loopback) against "
                            "the in-memory queue (benchmarks/replicas.py), instead of the batching arms "
                            "(default: %(default)s)")
    serve.set_defaults(run=run_serve)
    sd = targets.add_parser("sd", help="SD per component and per image: torch eager vs ONNX Runtime and OpenVINO "
                                       "variants, direct vs Triton")
    _sd_pipeline(sd, "full", "SD 1.5's full-size architecture with seeded random weights (default), or the tiny one")
    sd.add_argument("--steps", type=at_least(1), default=20, help="steps of the measured images")
    sd.add_argument("--repeats", type=at_least(1), default=3, help="timed calls per component after one warm-up")
    sd.add_argument("--variants", default="torch-fp32,onnxruntime-fp32,openvino-fp32,openvino-bf16,openvino-int8",
                    help="comma-separated; also onnxruntime-int8, openvino-fp16, openvino-int8-hybrid, and mixes "
                         "(openvino-int8-hybrid+vae=openvino-bf16: the VAE in another variant, as kiln build sd "
                         "--variant takes them)")
    sd.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1",
                    help="the model family of the seeded random checkpoint (sdxl: SDXL base's architecture)")
    sd.add_argument("--no-triton", action="store_true", help="skip the run through Triton + the orchestrator")
    sd.add_argument("--skip-build", action="store_true",
                    help="reuse the benchmark's checkpoint, repository and derived artifacts")
    sd.set_defaults(run=run_sd)
    edge = targets.add_parser("edge", help="kiln's served OpenVINO variants against OpenVINO GenAI's "
                                           "Text2ImagePipeline and diffusers (torch) on the same weights: seconds "
                                           "per image, cold start, peak memory, PSNR")
    _sd_pipeline(edge, "full", "SD 1.5's full-size architecture with seeded random weights (default), or the tiny one")
    edge.add_argument("--steps", type=at_least(1), default=20)
    edge.add_argument("--variants", default="openvino-fp32,openvino-bf16,openvino-int8,openvino-int4",
                      help="kiln's OpenVINO variants (comma-separated); GenAI runs at each one's precision")
    edge.add_argument("--no-genai", action="store_true", help="skip the GenAI rows")
    edge.set_defaults(run=run_edge)
    transport = targets.add_parser("transport", help="one denoising step's call to Triton outside the model: gRPC "
                                                     "against Triton's system shared memory")
    transport.add_argument("--out", type=Path, default=RESULTS)
    transport.add_argument("--calls", type=at_least(1), default=200, help="timed calls per shape and mode")
    transport.set_defaults(run=run_transport)
    wire = targets.add_parser("vit-wire", help="a ViT batch's way into the served vit: float32 pixel_values against "
                                               "uint8 pixels, over gRPC and Triton's system shared memory")
    wire.add_argument("--out", type=Path, default=RESULTS)
    wire.add_argument("--batch-sizes", type=int_list, default=(32, 256), help="comma-separated")
    wire.add_argument("--calls", type=at_least(1), default=10, help="timed calls per batch size and arm")
    wire.set_defaults(run=run_vit_wire)
    preprocess = targets.add_parser("preprocess", help="vit_preprocess (JPEG decode + eval transform) through Triton: "
                                                       "its thread pool, and --jpeg-draft, against one thread")
    preprocess.add_argument("--out", type=Path, default=RESULTS)
    preprocess.add_argument("--batch-sizes", type=int_list, default=(1, 8, 32), help="comma-separated")
    preprocess.add_argument("--calls", type=at_least(1), default=20,
                            help="timed calls per photo set, batch size and arm")
    preprocess.add_argument("--photo-sizes", type=size_list, default=((4032, 3024),),
                            help="the sample JPEGs also resized to these sizes, comma-separated WIDTHxHEIGHT, or none "
                                 "(default: 4032x3024, a phone's 12 MP photo)")
    preprocess.set_defaults(run=run_preprocess)


def _sd_pipeline(parser, default: str, help_text: str) -> None:
    """Where an SD benchmark writes, which pipeline it builds, and at which image side."""
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--pipeline", choices=("tiny", "full"), default=default, help=help_text)
    parser.add_argument("--size", type=at_least(0), default=0, help="image side (default: 64 tiny, 512 full)")


def run_vit(args) -> int:
    from benchmarks.vit import BenchOptions, run_benchmark

    run_benchmark(BenchOptions(out=args.out, variants=names(args.variants), batch_sizes=args.batch_sizes,
                               seconds=args.seconds, skip_build=args.skip_build))
    return 0


def run_serve(args) -> int:
    from benchmarks.serve import ServeBenchOptions, run_serve_benchmark

    if args.replicas == 2:
        from benchmarks.replicas import ReplicaBenchOptions, run_replica_benchmark

        run_replica_benchmark(ReplicaBenchOptions(out=args.out, pipeline=args.pipeline, concurrency=args.clients,
                                                  requests_per_client=args.requests_per_client, steps=args.steps,
                                                  skip_build=args.skip_build, size=args.size))
        return 0

    run_serve_benchmark(ServeBenchOptions(out=args.out, pipeline=args.pipeline, concurrency=args.clients,
                                          requests_per_client=args.requests_per_client, steps=args.steps,
                                          skip_build=args.skip_build, size=args.size))
    return 0


def run_sd(args) -> int:
    from benchmarks.sd import SDBenchOptions, run_sd_benchmark

    run_sd_benchmark(SDBenchOptions(out=args.out, pipeline=args.pipeline, size=args.size, steps=args.steps,
                                    repeats=args.repeats, variants=names(args.variants), triton=not args.no_triton,
                                    skip_build=args.skip_build, family=args.family))
    return 0


def run_edge(args) -> int:
    from benchmarks.edge import EdgeBenchOptions, run_edge_benchmark
    from kiln.errors import KilnError

    variants = names(args.variants)
    wrong = [v for v in variants if v not in ("openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-int4")]
    if wrong:
        raise KilnError(f"--variants: {', '.join(wrong)} not among openvino-fp32, openvino-bf16, openvino-int8, "
                        "openvino-int4 (the ones GenAI has a counterpart for)")
    run_edge_benchmark(EdgeBenchOptions(out=args.out, pipeline=args.pipeline, size=args.size, steps=args.steps,
                                        variants=variants, genai=not args.no_genai))
    return 0


def run_vit_wire(args) -> int:
    from benchmarks.vit_wire import VitWireBenchOptions, run_vit_wire_benchmark

    run_vit_wire_benchmark(VitWireBenchOptions(out=args.out, batch_sizes=args.batch_sizes, calls=args.calls))
    return 0


def run_transport(args) -> int:
    from benchmarks.transport import TransportBenchOptions, run_transport_benchmark

    run_transport_benchmark(TransportBenchOptions(out=args.out, calls=args.calls))
    return 0


def run_preprocess(args) -> int:
    from benchmarks.preprocess import PreprocessBenchOptions, run_preprocess_benchmark
    from build.vit.spec import VIT_SPEC
    from kiln.errors import KilnError
    from kiln.imaging import ImageLimits

    if not all(1 <= size <= VIT_SPEC.max_batch_size for size in args.batch_sizes):
        raise KilnError(f"--batch-sizes: each between 1 and {VIT_SPEC.max_batch_size} (the CPU build's batch limit)")
    limits = ImageLimits()  # what vit_preprocess accepts
    for width, height in args.photo_sizes:
        if min(width, height) < limits.min_side or width * height > limits.max_pixels:
            raise KilnError(f"--photo-sizes {width}x{height}: vit_preprocess takes sides of at least {limits.min_side} "
                            f"and at most {limits.max_pixels} pixels")
    run_preprocess_benchmark(PreprocessBenchOptions(out=args.out, batch_sizes=args.batch_sizes, calls=args.calls,
                                                     photo_sizes=args.photo_sizes))
    return 0
