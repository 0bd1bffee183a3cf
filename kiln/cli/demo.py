"""`kiln demo` (what `make demo` runs): build the repository, start Triton and the API, classify, embed, generate.

Steps:
 1. build vit_base_patch16_224.augreg2_in21k_ft_in1k (seeded random weights: no hub here), served
    with ONNX Runtime fp32, and a tiny seeded Stable Diffusion 1.x pipeline, into the repository
 2. start the embedded Triton on 127.0.0.1 (free ports), wait until every model is ready, and start
    the API service (AUTOMATIC1111-compatible) in front of it
 3. classify every sample image over gRPC (top-5), embed one over HTTP, generate (txt2img, img2img,
    ControlNet) with the library, then txt2img and classify once more through the API over HTTP
 4. write the results under out/demo/ and stop the server
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from kiln.errors import KilnError
from kiln.paths import DEFAULT_REPOSITORY, PROJECT_ROOT, SAMPLE_IMAGES, list_images

DEMO_PROMPT = "a photo of a cat sitting on a windowsill, soft light"


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="build, serve, classify, embed and generate with the sample images, stop")
    demo.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    demo.add_argument("--out", type=Path, default=PROJECT_ROOT / "out" / "demo")
    demo.set_defaults(run=lambda args: run_demo(args.repo, args.out))


def _through_api(api, out: Path) -> tuple[Path, str]:
    """An AUTOMATIC1111-style txt2img and a classification, over real HTTP."""
    with api.client(timeout=600) as http:
        response = http.post("/sdapi/v1/txt2img", json={
            "prompt": DEMO_PROMPT, "negative_prompt": "blurry", "steps": 20, "sampler_name": "Euler a", "seed": 42,
            "width": 128, "height": 128})
        if response.status_code != 200:
            raise KilnError(f"the API answered {response.status_code}: {response.text[:300]}")
        path = out / "api-txt2img.png"
        path.write_bytes(base64.b64decode(response.json()["images"][0]))
        photo = base64.b64encode((SAMPLE_IMAGES / "chelsea.jpg").read_bytes()).decode()
        result = http.post("/v1/classify", json={"images": [photo], "top_k": 1}).json()["results"][0]
    top = result.get("error") or f"{result['top'][0]['label']} ({result['top'][0]['score']:.4f})"
    return path, top


def run_demo(repository: Path, out: Path) -> int:
    from build.sd import ImageRange, SDBuildOptions, build_sd
    from build.sd.weights import write_sd_checkpoint
    from build.vit import ViTBuildOptions, build_vit
    from kiln.cli.classify import print_classifications, read_images
    from kiln.imaging import encode_png
    from kiln.infotext import parameters_text
    from kiln.triton_server import TritonOptions, TritonServer, free_port
    from kiln.vit import ViTClient
    from orchestrator.pipeline import ControlNetUnit, Img2ImgRequest, Pipeline, Txt2ImgRequest
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save(result, name: str, model: str) -> Path:
        path = out / name
        path.write_bytes(encode_png(result.images[0], {"parameters": parameters_text(result.info | {"model": model})}))
        return path

    # 1. Build.
    print("== 1/4 build the model repository: ViT-B/16 and a tiny Stable Diffusion", flush=True)
    build_vit(ViTBuildOptions(random_weights=True, variants=(), extra_exports=(), repository=repository))
    weights = out / "sd-tiny"
    if not (weights / "model_index.json").exists():
        write_sd_checkpoint(weights, size="tiny", seed=0)
    build_sd(SDBuildOptions(weights=str(weights), repository=repository, images=ImageRange(32, 128, 256)))

    # 2. Serve.
    print("== 2/4 start Triton and the API", flush=True)
    options = TritonOptions.on_free_ports(repository, out / "tritonserver.log")
    with TritonServer(options) as server:
        print(f"   ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}", flush=True)
        api = BackgroundAPI(Settings(triton_url=server.grpc_url, port=free_port()))
        print(f"   API ready: {api.url} (docs {api.url}/docs)", flush=True)

        # 3. Call.
        print("== 3/4 classify the sample images (gRPC, top-5) and embed one (HTTP)", flush=True)
        images = read_images(list_images(SAMPLE_IMAGES))
        classifications = ViTClient(server.grpc_url, "grpc").classify(images, top_k=5)
        print_classifications(classifications, indent="   ", name=lambda image: Path(image).name)
        embedding = ViTClient(server.http_url, "http").embed(images[:1], layer=-1, tokens=True)[0]
        pipeline = Pipeline.from_triton(server.grpc_url)
        print(f"   txt2img: {DEMO_PROMPT!r}, 20 steps, Euler a, seed 42, 128x128", flush=True)
        txt2img_path = save(pipeline.txt2img(Txt2ImgRequest(
            prompt=DEMO_PROMPT, negative_prompt="blurry", steps=20, sampler="Euler a", seed=42, width=128,
            height=128)), "txt2img.png", "sd-tiny (random)")
        print("   img2img: chelsea.jpg at strength 0.6, 20 steps, DPM++ 2M Karras, seed 42", flush=True)
        img2img_path = save(pipeline.img2img(Img2ImgRequest(
            prompt=DEMO_PROMPT, steps=20, sampler="DPM++ 2M Karras", seed=42, width=128, height=128,
            init_image=(SAMPLE_IMAGES / "chelsea.jpg").read_bytes(), denoising_strength=0.6)),
            "img2img.png", "sd-tiny (random)")
        print("   ControlNet: canny edges of coffee.png, weight 1.0, 20 steps, Euler a, seed 42", flush=True)
        controlnet_path = save(pipeline.txt2img(Txt2ImgRequest(
            prompt=DEMO_PROMPT, steps=20, sampler="Euler a", seed=42, width=128, height=128,
            controlnet=ControlNetUnit(image=(SAMPLE_IMAGES / "coffee.png").read_bytes(), module="canny"))),
            "controlnet.png", "sd-tiny (random) + ControlNet canny")
        print(f"   through the API: POST {api.url}/sdapi/v1/txt2img and /v1/classify", flush=True)
        try:
            api_path, api_top = _through_api(api, out)
        finally:
            api.stop()
        print(f"   API classify chelsea.jpg: {api_top}", flush=True)

    # 4. Results.
    print("== 4/4 results", flush=True)
    (out / "classify.json").write_text(json.dumps([r.as_dict() for r in classifications], indent=2))
    (out / "embed.json").write_text(json.dumps(embedding.as_dict(with_values=False) | (
        {"embedding_first8": [round(float(v), 5) for v in embedding.embedding[:8]]} if embedding.error is None else {}),
        indent=2))
    print("   NOTE: seeded random weights (no model hub here): the labels are meaningless and the")
    print("   image is noise-like; build with --weights DIR for real models.")
    print(f"   txt2img image:   {txt2img_path}")
    print(f"   img2img image:   {img2img_path}")
    print(f"   ControlNet image: {controlnet_path}")
    print(f"   API txt2img image: {api_path}")
    print(f"   classifications: {out / 'classify.json'}")
    print(f"   embedding:       {out / 'embed.json'}")
    print(f"   build report:    {Path(repository) / 'build-report.json'}")
    print(f"   Triton log:      {out / 'tritonserver.log'}")
    print(f"   done in {time.perf_counter() - started:.0f} s")
    failed = [r for r in classifications if r.error] + ([embedding] if embedding.error else [])
    return 1 if failed else 0
