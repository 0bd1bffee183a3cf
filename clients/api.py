"""A client of the API service's AUTOMATIC1111 routes (what `kiln generate --api URL` uses).

It speaks the server's own wire schemas (kiln.schemas): a body is validated here as the server
will validate it, and its fields are the server's.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
from pathlib import Path

from kiln import schemas
from kiln.errors import KilnError


class APIClient:
    """The AUTOMATIC1111 routes of a `kiln serve` (or of AUTOMATIC1111 itself), with HTTP Basic or an API key."""

    def __init__(self, url: str, *, auth: str | None = None, api_key: str | None = None,
                 timeout_s: float = 3600.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.auth = None
        if auth:
            user, _, password = auth.partition(":")
            self.auth = (user, password)

    def _client(self, timeout_s: float):
        import httpx

        return httpx.Client(base_url=self.url, auth=self.auth, headers=self.headers, timeout=timeout_s)

    def generate(self, body: schemas.Txt2ImgBody, *, show_progress: bool = False) -> schemas.GenerationResponse:
        """POST txt2img (or img2img for an Img2ImgBody); with show_progress, print the steps meanwhile."""
        import httpx

        route = "/sdapi/v1/img2img" if isinstance(body, schemas.Img2ImgBody) else "/sdapi/v1/txt2img"
        done = threading.Event()
        watcher = threading.Thread(target=self._show_progress, args=(done,), daemon=True) if show_progress else None
        if watcher is not None:
            watcher.start()
        try:
            with self._client(self.timeout_s) as client:
                response = client.post(route, json=body.model_dump(mode="json", exclude_unset=True))
        except httpx.HTTPError as exc:
            raise KilnError(f"cannot reach the API at {self.url} ({exc}); is `kiln serve` running?") from None
        finally:
            done.set()
            if watcher is not None:
                watcher.join()
                print(file=sys.stderr)
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise KilnError(f"the API answered {response.status_code}: {detail}")
        return schemas.GenerationResponse.model_validate(response.json())

    def _show_progress(self, done: threading.Event) -> None:
        import httpx

        with self._client(10) as client:
            while not done.wait(0.5):
                try:
                    state = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"]
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
                if state.get("sampling_steps"):
                    print(f"\rstep {state['sampling_step']}/{state['sampling_steps']}", end="", file=sys.stderr,
                          flush=True)


def save_images(response: schemas.GenerationResponse, out: Path) -> list[tuple[Path, int]]:
    """Write the generated images (they carry their parameters): OUT, or OUT-1, OUT-2 ... for several. Returns each
    path with its seed. The pictures that are not generated images are not written: those without an infotext (the
    returned masks of a server's return_mask settings, ControlNet's detected maps), and a grid before the images
    (info.index_of_first_image; a script's grid that does not say so: the images are the last with an infotext).
    Where none has an infotext (a server that writes none), the first of as many as there are seeds."""
    info = json.loads(response.info)
    seeds, pictures = info["all_seeds"], [base64.b64decode(b64) for b64 in
                                          response.images[info.get("index_of_first_image", 0):]]
    images = [data for data in pictures if _has_infotext(data)][-len(seeds):] or pictures
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (image, seed) in enumerate(zip(images, seeds)):
        path = out if len(seeds) == 1 else out.with_name(f"{out.stem}-{index + 1}{out.suffix}")
        path.write_bytes(image)
        written.append((path, seed))
    return written


def _has_infotext(data: bytes) -> bool:
    from PIL import Image, UnidentifiedImageError

    from kiln.infotext import infotext_of

    try:
        with Image.open(io.BytesIO(data)) as image:
            return bool(infotext_of(image))
    except (UnidentifiedImageError, OSError):
        return False
