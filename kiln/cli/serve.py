"""`kiln serve`: the embedded Triton and the API service in front of it; Ctrl-C or SIGTERM drains and stops."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from kiln.cli.args import above, at_least, names
from kiln.errors import KilnError
from kiln.lora import ENV as LORA_ENV
from kiln.paths import DEFAULT_REPOSITORY


def add_parser(commands) -> None:
    serve = commands.add_parser("serve", help="start Triton and the API (AUTOMATIC1111-compatible, port 7860); "
                                              "Ctrl-C / SIGTERM drains and stops")
    serve.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    serve.add_argument("--address", default="127.0.0.1", help="Triton's bind address (default: loopback only)")
    serve.add_argument("--http-port", type=at_least(1), default=8000, help="Triton HTTP port")
    serve.add_argument("--grpc-port", type=at_least(1), default=8001, help="Triton gRPC port")
    serve.add_argument("--metrics-port", type=at_least(1), default=8002, help="Triton metrics port")
    serve.add_argument("--log-verbose", type=at_least(0), default=0)
    serve.add_argument("--triton-log", type=Path, metavar="FILE",
                       help="Triton's log file, kept (default: one in a temporary folder, removed when Triton stops "
                            "cleanly and kept when it fails)")
    serve.add_argument("--triton-url", action="append", metavar="HOST:PORT",
                       help="use this running Triton (its gRPC address) instead of starting one; repeat for several "
                            "serving the same repository: each job runs on one that is ready and least busy, and "
                            "starts again on another if its Triton fails (dns:///NAME:PORT: gRPC spreads the calls "
                            "over every address the name resolves to)")
    serve.add_argument("--loras", type=Path, metavar="DIR",
                       help="LoRA files (.safetensors, kohya's or diffusers' layout) that prompts apply as "
                            "<lora:NAME:multiplier>, NAME a file's name; the API lists them and Triton's models read "
                            "them (a Triton of --triton-url reads its own KILN_LORAS folder). Default: loras/ in the "
                            "working directory, where there is one")
    checkpoints = serve.add_argument_group("checkpoints (kiln build sd --checkpoint NAME builds several into one "
                                           "repository)")
    checkpoints.add_argument("--checkpoints", type=Path, metavar="DIR",
                             help="a folder of checkpoints (single .safetensors files, SD 1.x or 2.x, or diffusers "
                                  "folders), as AUTOMATIC1111's models/Stable-diffusion: each is built into the "
                                  "repository as a checkpoint named by its file before Triton starts, or reused when "
                                  "its build is of the same file (default: checkpoints/ in the working directory, "
                                  "where there is one)")
    checkpoints.add_argument("--max-checkpoints", type=at_least(0), default=0, metavar="N",
                             help="keep at most N checkpoints loaded in Triton: the default one at start, the others "
                                  "when a request names one, the least recently used idle one unloaded to make room "
                                  "(default 0: every checkpoint loaded at start, none unloaded)")
    checkpoints.add_argument("--checkpoint-memory-gb", type=at_least(0, float), default=0.0, metavar="GB",
                             help="the same, by the size of the checkpoints' models (their files): a checkpoint "
                                  "larger than this is refused (default 0: no byte budget)")
    api = serve.add_argument_group("API service")
    api.add_argument("--no-api", action="store_true", help="serve Triton only")
    api.add_argument("--listen", default="127.0.0.1", help="API bind address (any but loopback needs --api-auth or "
                                                           "--api-keys)")
    api.add_argument("--port", type=at_least(1), default=7860, help="API port")
    api.add_argument("--api-auth", help="HTTP Basic credentials user:pass[,user:pass]")
    api.add_argument("--api-keys", default=os.environ.get("KILN_API_KEYS"),
                     help="comma-separated API keys (X-API-Key or Authorization: Bearer); default: $KILN_API_KEYS")
    api.add_argument("--metrics-token", default=os.environ.get("KILN_METRICS_TOKEN", ""),
                     help="a token that opens /metrics alone (Authorization: Bearer TOKEN), for Prometheus without "
                          "the API's credentials (default: $KILN_METRICS_TOKEN; none: /metrics takes the API's)")
    api.add_argument("--rate-limit", type=at_least(0, float), default=0.0,
                     help="requests per minute per client (0: none)")
    api.add_argument("--cors-origins", default="", help="comma-separated allowed origins (default: CORS closed)")
    api.add_argument("--queue-size", type=at_least(1), default=64,
                     help="jobs waiting beyond the running ones; more is 429")
    api.add_argument("--workers", type=at_least(1), default=16, help="generations running at once")
    api.add_argument("--no-step-batching", action="store_true", help="do not merge UNet steps across requests")
    api.add_argument("--max-batch-rows", type=at_least(0), default=0,
                     help="rows per merged UNet call (0: the model's max)")
    api.add_argument("--shared-memory", choices=("auto", "on", "off"), default="auto",
                     help="denoising steps' tensors through Triton's system shared memory: auto (when Triton is on "
                          "this host and can map it), on (or fail), off (always over gRPC)")
    api.add_argument("--request-timeout", type=above(0), default=600.0, help="seconds before a generation is a 504")
    api.add_argument("--drain-timeout", type=at_least(0, float), default=60.0, metavar="SECONDS",
                     help="on SIGTERM, open requests and queued jobs get this long to finish; what is left is then "
                          "cancelled (a pod's grace period should be at least this + 10; default: %(default)s)")
    api.add_argument("--redis", default=os.environ.get("KILN_REDIS_URL", ""), metavar="URL",
                     help="share the job queue, task state, progress and rate limits with every orchestrator using "
                          "this Redis (redis://[:password@]host:port/db; default: $KILN_REDIS_URL; none: this "
                          "process's own): any of them answers for any task, and one that dies leaves its running "
                          "jobs to the others")
    api.add_argument("--redis-lease", type=above(0), default=15.0, metavar="SECONDS",
                     help="with --redis, an orchestrator that has not renewed a running job's lease this long is "
                          "taken for dead and another runs the job again (default: %(default)s)")
    api.add_argument("--max-steps", type=at_least(1), default=150, help="most sampling steps a request may ask for")
    api.add_argument("--vae-tile-above", type=at_least(0), default=1024 * 1024, metavar="PIXELS",
                     help="decode and encode images of more pixels than this in VAE tiles, as diffusers' "
                          "enable_vae_tiling (memory of one tile; seams blended); a request's vae_tiling true/false "
                          "decides for itself (default 1048576: above 1024x1024)")
    api.add_argument("--vae-tile", type=int, default=0, metavar="PIXELS",
                     help="the VAE tiles' side (default 0: the VAE's own sample size, 512 for SD 1.x, as diffusers); "
                          "smaller tiles take less memory and leave more seams")
    api.add_argument("--styles", type=Path, default=Path("styles.csv"),
                     help="AUTOMATIC1111's styles.csv (name, prompt, negative_prompt) that requests' `styles` name "
                          "(default: styles.csv in the working directory, where there is one; read again when it "
                          "changes)")
    api.add_argument("--embeddings", type=Path, metavar="DIR",
                     help="AUTOMATIC1111's textual-inversion embeddings (.safetensors; a prompt uses one by its file's "
                          "name); default: embeddings/ in the working directory, where there is one; read again when "
                          "a file is added or removed and on POST /sdapi/v1/refresh-embeddings")
    api.add_argument("--outputs", type=Path, default=Path("outputs"), metavar="DIR",
                     help="where requests with save_images write their PNGs (with the infotext), as AUTOMATIC1111: "
                          "DIR/txt2img-images/<date>/, DIR/img2img-images/<date>/ (default: outputs)")
    serve.set_defaults(run=run)


def loras_folder(args) -> Path | None:
    """--loras, or loras/ in the working directory where there is one."""
    if args.loras is not None:
        if not args.loras.is_dir():
            raise KilnError(f"--loras {args.loras}: no such folder")
        return args.loras
    return Path("loras") if Path("loras").is_dir() else None


def settings_from(args):
    """The API settings the flags describe, validated before anything starts."""
    from orchestrator.pipeline import Limits
    from orchestrator.security import SecurityOptions, check_exposure, parse_credentials
    from orchestrator.server.settings import Settings

    if args.redis and not args.redis.startswith(("redis://", "rediss://", "unix://")):
        raise KilnError(f"--redis {args.redis!r}: expected a URL such as redis://host:6379/0")
    if args.vae_tile and (args.vae_tile < 64 or args.vae_tile % 64):
        raise KilnError(f"--vae-tile must be a multiple of 64 pixels (64, 128, ..., 512), got {args.vae_tile}")
    security = SecurityOptions(credentials=tuple(parse_credentials(args.api_auth)), api_keys=names(args.api_keys or ""),
                               rate_limit_per_minute=args.rate_limit, metrics_token=args.metrics_token,
                               redis_url=args.redis)
    check_exposure(args.listen, security)
    if args.embeddings is not None and not args.embeddings.is_dir():
        raise KilnError(f"--embeddings {args.embeddings}: no such folder")
    host = "127.0.0.1" if args.address in ("0.0.0.0", "") else args.address
    urls = list(dict.fromkeys(args.triton_url or ()))
    triton_url = urls[0] if urls else f"{host}:{args.grpc_port}"
    return Settings(triton_url=triton_url, replica_urls=tuple(urls[1:]), model_control=model_control(args, triton_url),
                    max_queue=args.queue_size,
                    workers=args.workers, step_batching=not args.no_step_batching, max_batch_rows=args.max_batch_rows,
                    shared_memory=args.shared_memory, request_timeout_s=args.request_timeout,
                    drain_timeout_s=args.drain_timeout, redis_url=args.redis, lease_s=args.redis_lease,
                    limits=Limits(max_steps=args.max_steps, vae_tile_above=args.vae_tile_above, vae_tile=args.vae_tile),
                    cors_origins=names(args.cors_origins), security=security, listen=args.listen, port=args.port,
                    styles_file=args.styles, outputs_dir=args.outputs,
                    embeddings_dir=args.embeddings or Path("embeddings"), loras_dir=loras_folder(args))


def model_control(args, triton_url: str):
    """Triton's models loaded on demand under --max-checkpoints / --checkpoint-memory-gb, or None."""
    if not (args.max_checkpoints or args.checkpoint_memory_gb):
        return None
    if args.triton_url:
        raise KilnError("--max-checkpoints and --checkpoint-memory-gb control the Triton kiln serve starts; a "
                        "Triton of --triton-url loads its own models")
    from orchestrator.checkpoints import GB, ModelControl

    return ModelControl(args.repo, triton_url, args.max_checkpoints, int(args.checkpoint_memory_gb * GB))


def run(args) -> int:
    from kiln.triton_server import TritonOptions, TritonServer

    settings = None if args.no_api else settings_from(args)
    if args.triton_url:
        if settings is None:
            raise KilnError("--triton-url with --no-api leaves nothing to serve")
        if args.checkpoints is not None:
            raise KilnError("--checkpoints builds into the repository of the Triton kiln serve starts; a Triton of "
                            "--triton-url serves its own repository")
        return _serve_api(settings, None)
    loras = loras_folder(args)  # Triton's models read the files the service lists
    folder = args.checkpoints if args.checkpoints is not None else (
        Path("checkpoints") if Path("checkpoints").is_dir() else None)
    if folder is not None:
        from build.sd.folder import sync_checkpoints

        synced = sync_checkpoints(folder, args.repo)
        print("checkpoints: " + ", ".join(f"{s.name} ({s.status})" for s in synced) if synced else
              f"checkpoints: {folder} holds none", flush=True)
        if settings is not None and settings.model_control is not None:  # new files: built on refresh-checkpoints
            settings.sync_checkpoints = lambda: sync_checkpoints(folder, args.repo, progress=False)
    control = settings.model_control if settings is not None else model_control(args, "")
    server = TritonServer(TritonOptions(repository=args.repo, address=args.address, http_port=args.http_port,
                                        grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                                        log_verbose=args.log_verbose, log_path=args.triton_log,
                                        extra_env={LORA_ENV: str(loras.resolve())} if loras else {},
                                        load_models=control.startup_models() if control is not None else None))
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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("Ctrl-C stops", flush=True)
    try:
        while not stop.wait(0.5):
            if not server.is_running():
                raise KilnError(f"tritonserver exited unexpectedly:\n{server.explain()}")
    finally:
        print(f"Triton stopped (exit code {server.stop()})", flush=True)
    return 0


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _serve_api(settings, triton) -> int:
    """uvicorn until SIGINT/SIGTERM (it drains open requests), then Triton is stopped."""
    from orchestrator.server.service import run_api

    def started():
        print(f"API ready: http://{settings.listen}:{settings.port}  (docs /docs, AUTOMATIC1111 /sdapi/v1, "
              f"tasks /v1/tasks, metrics /metrics); Ctrl-C or SIGTERM drains and stops", flush=True)

    try:
        run_api(settings, on_started=started)
    finally:
        if triton is not None:
            print(f"Triton stopped (exit code {triton.stop()})", flush=True)
    return 0
