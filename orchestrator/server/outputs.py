"""AUTOMATIC1111's save_images: a finished job's images written to the outputs folder, each a PNG with its infotext,
as its UI saves them: outputs/txt2img-images/<date>/<number>-<seed>.png (img2img-images for img2img), numbered on
from the highest number in that folder."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from kiln.imaging import encode_png
from kiln.infotext import parameters_text
from orchestrator.jobs import Job, Status

_LOCK = threading.Lock()  # numbering: two jobs finishing at once must not take the same number
_NUMBERED = re.compile(r"^(\d{5})-")


def save_job_images(job: Job, folder: Path) -> list[Path]:
    """Write a done job's images under `folder` (nothing for a failed or cancelled one); return their paths."""
    if job.status != Status.DONE or not job.images:
        return []
    day = folder / f"{'img2img' if job.kind == 'img2img' else 'txt2img'}-images" / time.strftime("%Y-%m-%d")
    paths = []
    with _LOCK:
        day.mkdir(parents=True, exist_ok=True)
        number = 1 + max((int(m.group(1)) for p in day.iterdir() if (m := _NUMBERED.match(p.name))), default=-1)
        for offset, (image, info) in enumerate(zip(job.images, job.infos)):
            path = day / f"{number + offset:05d}-{info.get('seed')}.png"
            path.write_bytes(encode_png(image, {"parameters": parameters_text(info)}))
            paths.append(path)
    return paths
