"""A client of the API service's AUTOMATIC1111 routes (what `kiln generate --api URL` uses)."""

from __future__ import annotations

import base64
import json
import sys
import threading
from pathlib import Path

from build.errors import KilnError


def a1111_body(request) -> dict:
    """A pipeline request (orchestrator.diffusion) as AUTOMATIC1111's txt2img/img2img JSON body."""
    from orchestrator.diffusion import Img2ImgRequest

    body = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
            "sampler_name": request.sampler, "cfg_scale": request.cfg_scale, "seed": request.seed,
            "width": request.width, "height": request.height, "batch_size": request.batch_size, "eta": request.eta,
            "subseed": request.subseed, "subseed_strength": request.subseed_strength}
    if request.controlnet_units:
        body["alwayson_scripts"] = {"controlnet": {"args": [{
            "enabled": True, "image": base64.b64encode(unit.image).decode(), "module": unit.module,
            "model": unit.model or "None",
            "weight": unit.weight, "guidance_start": unit.guidance_start, "guidance_end": unit.guidance_end,
            "threshold_a": unit.low_threshold, "threshold_b": unit.high_threshold} for unit in request.controlnet_units]}}
    if isinstance(request, Img2ImgRequest):
        body |= {"init_images": [base64.b64encode(request.init_image).decode()],
                 "denoising_strength": request.denoising_strength, "mask_blur": request.mask_blur,
                 "inpainting_mask_invert": int(request.inpainting_mask_invert),
                 # Sent explicitly: the service's defaults are AUTOMATIC1111's (fill 0, only masked), not the library's.
                 "inpainting_fill": request.inpainting_fill, "inpaint_full_res": request.inpaint_full_res,
                 "inpaint_full_res_padding": request.inpaint_full_res_padding}
        if request.mask:
            body["mask"] = base64.b64encode(request.mask).decode()
    return body


def generate_via_api(url: str, request, out: Path, *, auth: str | None = None, api_key: str | None = None,
                     timeout_s: float = 3600.0) -> int:
    """POST the request, show the service's progress meanwhile, write the returned PNGs (with their parameters)."""
    import httpx

    from orchestrator.diffusion import Img2ImgRequest

    headers = {"X-API-Key": api_key} if api_key else {}
    basic = None
    if auth:
        user, _, password = auth.partition(":")
        basic = (user, password)
    route = "/sdapi/v1/img2img" if isinstance(request, Img2ImgRequest) else "/sdapi/v1/txt2img"
    done = threading.Event()

    def show_progress():
        with httpx.Client(base_url=url, auth=basic, headers=headers, timeout=10) as client:
            while not done.wait(0.5):
                try:
                    state = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"]
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
                if state.get("sampling_steps"):
                    print(f"\rstep {state['sampling_step']}/{state['sampling_steps']}", end="", file=sys.stderr,
                          flush=True)

    watcher = threading.Thread(target=show_progress, daemon=True)
    watcher.start()
    try:
        with httpx.Client(base_url=url, auth=basic, headers=headers, timeout=timeout_s) as client:
            response = client.post(route, json=a1111_body(request))
    except httpx.HTTPError as exc:
        raise KilnError(f"cannot reach the API at {url} ({exc}); is `kiln serve` running?") from None
    finally:
        done.set()
        watcher.join()
        print(file=sys.stderr)
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise KilnError(f"the API answered {response.status_code}: {detail}")
    payload = response.json()
    seeds = json.loads(payload["info"])["all_seeds"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for index, (image, seed) in enumerate(zip(payload["images"], seeds)):
        path = out if len(payload["images"]) == 1 else out.with_name(f"{out.stem}-{index + 1}{out.suffix}")
        path.write_bytes(base64.b64decode(image))
        print(f"wrote {path} (seed {seed})")
    return 0
