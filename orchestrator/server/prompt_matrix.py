"""AUTOMATIC1111's Prompt matrix script (`script_name: "prompt matrix"`) over the API: the prompt's parts after the
first `|` switched on and off in every combination, each combination an image; the images in a grid labelled with the
parts each has (struck through where it has not), as its scripts/prompt_matrix.py and images.draw_prompt_matrix.

script_args as AUTOMATIC1111 1.10's script takes them: [put_at_start, different_seeds, prompt_type,
variations_delimiter, margin_size]: the variable parts before the fixed one; seed + i for combination i (else every
image the seed's); "positive" or "negative" (which prompt holds the `|`s); "comma" or "space" (what joins the parts);
the grid's margins. Combination i has part k + 1 where bit k of i is set. Each combination is a task of the caller's,
all queued at once, so the step batcher denoises them together (cells.run_cells). The answer: the grid, then every
image; the grid's infotext is the first image's. /sdapi/v1/interrupt ends the matrix (as AUTOMATIC1111's): the images
made are answered, the combinations not started are black in the grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import InputError
from orchestrator.jobs import Status
from orchestrator.server import cells
from orchestrator.server.cells import answer, fix_seeds, run_cells, save
from orchestrator.server.generation import pipeline

# its arguments as AUTOMATIC1111's /sdapi/v1/script-info lists them
ARGS = [{"label": "Put variable parts at start of prompt", "value": False},
        {"label": "Use different seed for each picture", "value": False},
        {"label": "Select prompt", "value": "positive", "choices": ["positive", "negative"]},
        {"label": "Select joining char", "value": "comma", "choices": ["comma", "space"]},
        {"label": "Grid margins (px)", "value": 0, "minimum": 0, "maximum": 500, "step": 2}]
MAX_PARTS = 7  # 64 combinations, the X/Y/Z plot's cap
ACTIVE, INACTIVE = (0, 0, 0), (153, 153, 153)  # AUTOMATIC1111's label colours


@dataclass(frozen=True)
class Matrix:
    parts: tuple[str, ...]  # the prompt split at "|": the fixed part, then the variable ones
    prompts: tuple[str, ...]  # combination i's prompt
    negative: bool  # the negative prompt holds the parts
    different_seeds: bool
    margin_size: int


def parse(body: schemas.Txt2ImgBody) -> Matrix:
    """The matrix a body's script_args describe; an InputError naming what cannot run."""
    args = list(body.script_args)
    if len(args) > 5:
        raise InputError(f"script_args: the prompt matrix takes at most 5 values (AUTOMATIC1111 1.10's), got "
                         f"{len(args)}")
    put_at_start, different_seeds, prompt_type, delimiter, margin = args + [False, False, "positive", "comma", 0][
        len(args):]
    prompt_type, delimiter = str(prompt_type or "positive").lower(), str(delimiter or "comma").lower()
    if prompt_type not in ("positive", "negative"):
        raise InputError(f"script_args: prompt matrix prompt_type must be positive or negative, got {prompt_type!r}")
    if delimiter not in ("comma", "space"):
        raise InputError(f"script_args: prompt matrix variations_delimiter must be comma or space, got {delimiter!r}")
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 500:
        raise InputError(f"script_args: margin_size must be within [0, 500], got {margin!r}")
    if body.n_iter != 1:  # AUTOMATIC1111 sets the batch count itself
        raise InputError(f"n_iter: the prompt matrix makes one image per combination of its parts; its batch count is "
                         f"its own (got {body.n_iter})")
    parts = tuple((body.negative_prompt if prompt_type == "negative" else body.prompt).split("|"))
    if len(parts) > MAX_PARTS:
        raise InputError(f"prompt matrix: {len(parts) - 1} variable parts make {2 ** (len(parts) - 1)} images; this "
                         f"server makes at most {2 ** (MAX_PARTS - 1)} (up to {MAX_PARTS - 1} parts)")
    joiner = ", " if delimiter == "comma" else " "
    prompts = []
    for combination in range(2 ** (len(parts) - 1)):
        chosen = [text.strip().strip(",") for k, text in enumerate(parts[1:]) if combination & (1 << k)]
        prompts.append(joiner.join(chosen + [parts[0]] if put_at_start else [parts[0]] + chosen))
    return Matrix(parts, tuple(prompts), prompt_type == "negative", bool(different_seeds), int(margin))


def bodies(body: schemas.Txt2ImgBody, matrix: Matrix) -> list[schemas.Txt2ImgBody]:
    """Each combination's body: its prompt, the seed (drawn once where -1) plus its index with different_seeds."""
    fixed = fix_seeds(body)
    field = "negative_prompt" if matrix.negative else "prompt"
    return [fixed.model_copy(update={"script_name": None, "script_args": [], field: prompt, "batch_size": 1,
                                     "seed": fixed.seed + (i if matrix.different_seeds else 0)})
            for i, prompt in enumerate(matrix.prompts)]


def draw(matrix: Matrix, images: list[np.ndarray]) -> np.ndarray:
    """The combinations' images in AUTOMATIC1111's grid: 2^ceil(n/2) columns (the first half of the n variable parts),
    2^floor(n/2) rows (the others); over each column and beside each row its parts, black where its images have them,
    grey and struck through where not."""
    from PIL import Image, ImageDraw, ImageFont

    variable = list(matrix.parts[1:])
    half = (len(variable) + 1) // 2
    across, down = variable[:half], variable[half:]
    cols, rows = 2 ** len(across), 2 ** len(down)
    height, width = images[0].shape[:2]
    size = max(8, (width + height) // 25)
    font, spacing, margin = ImageFont.load_default(size=size), size // 2, matrix.margin_size
    line = size + spacing
    top = len(across) * line + spacing * 2 if across else 0
    left = width * 3 // 4 if down else 0
    canvas = Image.new("RGB", (left + cols * width + (cols - 1) * margin, top + rows * height + (rows - 1) * margin),
                       "white")
    pen = ImageDraw.Draw(canvas)
    for index, pixels in enumerate(images):
        row, col = divmod(index, cols)
        canvas.paste(Image.fromarray(pixels), (left + col * (width + margin), top + row * (height + margin)))

    def labels(texts: list[str], position: int, x: float, y: float) -> None:
        for k, text in enumerate(texts):
            active, text = bool(position & (1 << k)), text.strip()
            pen.text((x, y + k * line), text, fill=ACTIVE if active else INACTIVE, font=font, anchor="mm")
            if not active:
                half_width = pen.textlength(text, font=font) / 2
                pen.line((x - half_width, y + k * line, x + half_width, y + k * line), fill=INACTIVE, width=2)

    for col in range(cols if across else 0):
        labels(across, col, left + col * (width + margin) + width / 2, spacing + size / 2)
    for row in range(rows if down else 0):
        middle = top + row * (height + margin) + height / 2 - (len(down) - 1) * line / 2
        labels(down, row, left / 2, middle)
    return np.asarray(canvas)


async def run(request, kind: str, body: schemas.Txt2ImgBody) -> dict:
    """The matrix for an /sdapi/v1 request: every combination checked, queued at once and waited for; the grid first
    in the answer, then each image."""
    await pipeline(request)  # the server's default checkpoint is set, and Triton is there
    matrix = parse(body)
    jobs = await run_cells(request, kind, bodies(body, matrix),
                           lambda i: f"prompt matrix image {i} ({matrix.prompts[i]!r})")
    for index, job in enumerate(jobs):
        if (job.status != Status.DONE or not job.images) and not cells.stopped(job):
            raise InputError(f"prompt matrix: image {index} ({matrix.prompts[index]!r}) was not made "
                             f"({job.error or job.status.value})")
    made = [job for job in jobs if job.images]  # all, unless /sdapi/v1/interrupt ended the matrix
    if not made:
        return cells.nothing_made(request, body, jobs[0])
    images = [(job.images[0], job.infos[0]) for job in made]
    blank = np.zeros_like(images[0][0])  # a combination the interrupt kept from running, black in the grid
    grid = await run_in_threadpool(draw, matrix, [job.images[0] if job.images else blank for job in jobs])
    await save(request, body, kind, made, grid, images[0][1], "prompt_matrix")
    details = cells.details(made[0], [info for _, info in images], before=(images[0][1],), jobs=jobs)
    details["index_of_first_image"] = 1  # (its grid first, as there)
    details["prompt_matrix"] = {"images": len(made), "interrupted": len(jobs) - len(made),
                                "seconds": round(time.time() - jobs[0].created, 3)}
    return await answer(request, body, [(grid, images[0][1]), *images], details)
