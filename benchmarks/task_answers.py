"""What a done job's AUTOMATIC1111 answer costs (a1111.to_response: the grid, the PNG encodes, the info), made anew
as every /sdapi answer and, before they were kept, every GET /v1/tasks/{id} poll of a done task made it, against a
task's kept answer (made once per encoding), measured in the same run; and what a saving job's files and answer
cost together (outputs.save_job_images, then its answer), each picture encoded twice as before (once for its file,
once for the answer) against once (outputs.Encoded: the answer takes its files' bytes); and an answer's pictures
encoded one after another, as before, against side by side (outputs.encoded, on as many threads as cores). A batch
of 4 photographs (astronaut.jpg resized) with save_images (their grid first, and saved), at 512, 768 and 1024 pixels
a side; one torch thread.

    python -m benchmarks.task_answers [--sides 512 768 1024] [--repeats 5] [--out benchmarks/results]

Prints a table and writes task_answers.json in --out; each ratio is against the first arm of its kind, of its size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("answer made (an /sdapi answer; a task poll before)", "task poll (its answer kept)",
        "files and answer, each picture encoded twice (before)", "files and answer, encoded once",
        "an answer's pictures encoded one after another (before)", "an answer's pictures encoded side by side")


def _arms(side: int, folder: Path) -> dict[str, float]:
    from PIL import Image

    from benchmarks.load import time_each
    from kiln import schemas
    from kiln.imaging import PNG
    from kiln.paths import SAMPLE_IMAGES
    from orchestrator.jobs import Job, Status
    from orchestrator.pipeline import Txt2ImgRequest
    from orchestrator.server.a1111 import to_response
    from orchestrator.server.outputs import Encoded, Outputs, answer_grid, encoded, save_job_images

    photo = np.asarray(Image.open(SAMPLE_IMAGES / "astronaut.jpg").convert("RGB").resize((side, side)))
    images = [np.roll(photo, shift, axis=1) for shift in range(0, 4 * side // 8, side // 8)]  # (4 unlike images)
    infos = [{"prompt": "an astronaut", "seed": 7 + i, "steps": 20, "width": side, "height": side} for i in range(4)]
    body = schemas.Txt2ImgBody(prompt="an astronaut", batch_size=4, save_images=True)

    def job(family: str, **context) -> Job:
        return Job(kind="txt2img", request=Txt2ImgRequest(prompt="an astronaut", batch_size=4), status=Status.DONE,
                   images=images, infos=infos, context={"body": body, "grid": True, "family": family, **context})

    def saved(**context) -> None:
        done = job("sdapi", **context)
        assert len(save_job_images(done, Outputs(folder))) == 5  # (the 4 images and their grid)
        to_response(done, body, PNG)

    task = job("tasks")
    to_response(task, body, PNG)  # (its first poll made it)
    pictures = [(PNG, picture, {"parameters": f"an astronaut, Seed: {7 + i}"})
                for i, picture in enumerate([answer_grid([(image, None) for image in images]), *images])]
    return time_each(ARMS, (lambda: to_response(job("sdapi"), body, PNG), lambda: to_response(task, body, PNG),
                            saved, lambda: saved(encoded=Encoded()),
                            lambda: [how.encode(picture, text) for how, picture, text in pictures],
                            lambda: encoded(pictures)))


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.load import by_size

    with tempfile.TemporaryDirectory(prefix="kiln-saved-") as folder:
        return by_size(argv, __doc__, ARMS, lambda side: _arms(side, Path(folder)), lambda index: index // 2 * 2,
                       "task_answers", RESULTS)


if __name__ == "__main__":
    main()
