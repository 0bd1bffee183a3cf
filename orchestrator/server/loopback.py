"""AUTOMATIC1111's Loopback script (`script_name: "loopback"`, img2img) over the API: img2img run `loops` times, each
loop's image the next loop's init image, the denoising strength moving from the request's to the final one along a
curve, as its scripts/loopback.py.

script_args as AUTOMATIC1111 1.10's script takes them: [loops, final_denoising_strength, denoising_curve,
append_interrogation]: 1 to 32 loops (its slider's range); the final strength in [0, 1]; "Aggressive" (sin),
"Linear" or "Lazy" (1 - cos) of the loop's progress k / (loops - 1); "None" only (kiln has no CLIP interrogator or
DeepBooru to append a caption with: another value is refused).

As there: the seed is fixed once and loop k of chain n runs seed + n x loops + k; after the first loop the masked
content is "original" (the previous image's); n_iter runs that many chains, each from the request's init image, and
their last images are the answer (with one chain, every loop's image); more than one image comes after a grid of
them in one row. Each loop's infotext carries "Final denoising strength" and "Denoising curve". The chains are
queued side by side, so the step batcher denoises their loops together (AUTOMATIC1111 runs one after another).
With img2img_color_correction, every loop's images are matched to the request's init image (not the loop's own).
batch_size must be 1: AUTOMATIC1111 sets it to 1 and kiln refuses what it would not run as sent.
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from kiln import schemas
from kiln.errors import InputError
from kiln.imaging import encode_png
from orchestrator.jobs import Job, Status
from orchestrator.server import cells
from orchestrator.server.generation import outputs_of, pipeline
from orchestrator.server.outputs import image_grid

CURVES = {"aggressive": ("Aggressive", lambda progress: math.sin(progress * math.pi / 2)),
          "linear": ("Linear", lambda progress: progress),
          "lazy": ("Lazy", lambda progress: 1 - math.cos(progress * math.pi / 2))}
MAX_LOOPS = 32
# its arguments as AUTOMATIC1111's /sdapi/v1/script-info lists them
ARGS = [{"label": "Loops", "value": 4, "minimum": 1, "maximum": MAX_LOOPS, "step": 1},
        {"label": "Final denoising strength", "value": 0.5, "minimum": 0, "maximum": 1, "step": 0.01},
        {"label": "Denoising strength curve", "value": "Linear", "choices": ["Aggressive", "Linear", "Lazy"]},
        {"label": "Append interrogated prompt at each iteration", "value": "None", "choices": ["None"]}]


@dataclass(frozen=True)
class Loopback:
    loops: int
    first: float  # the request's denoising strength: the first loop's
    final: float  # the last loop's
    curve: str  # AUTOMATIC1111's name of it

    def strength(self, loop: int) -> float:
        """Loop `loop`'s denoising strength (0 the first), AUTOMATIC1111's calculate_denoising_strength."""
        if self.loops == 1:
            return self.first
        return self.first + (self.final - self.first) * CURVES[self.curve.lower()][1](loop / (self.loops - 1))


def parse(body: schemas.Img2ImgBody) -> Loopback:
    """The loops a body's script_args describe; an InputError naming what cannot run."""
    args = list(body.script_args)
    if len(args) > 4:
        raise InputError(f"script_args: loopback takes at most 4 values (AUTOMATIC1111 1.10's [loops, "
                         f"final_denoising_strength, denoising_curve, append_interrogation]), got {len(args)}")
    loops, final, curve, interrogation = args + [4, 0.5, "Linear", "None"][len(args):]
    if isinstance(loops, bool) or not isinstance(loops, int | float) or loops != int(loops) \
            or not 1 <= loops <= MAX_LOOPS:
        raise InputError(f"script_args: loopback loops must be a whole number from 1 to {MAX_LOOPS}, got {loops!r}")
    if isinstance(final, bool) or not isinstance(final, int | float) or not 0 <= final <= 1:
        raise InputError(f"script_args: loopback final_denoising_strength must be within [0, 1], got {final!r}")
    if str(curve).lower() not in CURVES:
        raise InputError(f"script_args: loopback denoising_curve must be Aggressive, Linear or Lazy, got {curve!r}")
    if interrogation not in (None, "None"):
        raise InputError(f"script_args: loopback append_interrogation {interrogation!r} is not supported by this "
                         "server: it has no CLIP interrogator or DeepBooru (it runs 'None')")
    if body.batch_size != 1:
        raise InputError(f"batch_size: loopback runs one image per loop (AUTOMATIC1111 sets batch_size to 1; got "
                         f"{body.batch_size}); n_iter runs that many loopbacks")
    first = 0.75 if body.denoising_strength is None else body.denoising_strength
    return Loopback(int(loops), first, float(final), CURVES[str(curve).lower()][0])


def loop_cell(body: schemas.Img2ImgBody, loopback: Loopback, number: int, loop: int,
              init: list[str]) -> schemas.Img2ImgBody:
    """Loop `loop` of chain `number` as an img2img request from `init` (the loop before's image): its seed and
    strength; after the first loop, the masked content "original"; every loop's colour correction (where
    img2img_color_correction is on) towards the request's init image, as the script sets it once for all loops."""
    cell = body.model_copy(update={
        "script_name": None, "script_args": [], "n_iter": 1, "init_images": init,
        "seed": body.seed + number * loopback.loops + loop, "denoising_strength": loopback.strength(loop),
        **({"inpainting_fill": 1} if loop else {})})
    cell._color_target = body.init_images[0] if body.init_images else ""
    return cell


async def chain(request, body: schemas.Img2ImgBody, loopback: Loopback, number: int) -> tuple[list[Job], Job]:
    """Chain `number`'s loops, one after another: each loop's image the next one's init image. The loops done and
    the last job run. An interrupted or skipped loop ends the chain, its image left out (as AUTOMATIC1111's breaks
    before keeping it); a failed one fails the request."""
    done, init = [], body.init_images
    for loop in range(loopback.loops):
        cell = loop_cell(body, loopback, number, loop, init)
        name = f"loopback loop {loop + 1}" + (f" of chain {number + 1}" if number else "")
        [job] = await cells.run_cells(request, "img2img", [cell], lambda _, name=name: name)
        if job.error is not None:  # with its own status: the loop's input (422) or the server's trouble
            raise job.error
        if job.status != Status.DONE or not job.images or job.interrupted or job.skipped:
            break
        for info in job.infos:
            info.update(final_denoising_strength=loopback.final, denoising_curve=loopback.curve)
        done.append(job)
        init = [base64.b64encode(await run_in_threadpool(encode_png, job.images[0])).decode()]
    return done, job


async def run(request, kind: str, body: schemas.Img2ImgBody) -> dict:
    """The loopback of an /sdapi/v1/img2img request: its chains queued side by side, each loop waiting for the one
    before it; the grid of the images answered (with more than one), then the images."""
    if kind != "img2img":
        raise InputError("script_name 'loopback' is an img2img script (/sdapi/v1/img2img): it starts from an image")
    served = await pipeline(request)  # the server's default checkpoint is set, and Triton is there
    loopback = parse(body)
    if not 1 <= body.n_iter <= served.limits.max_n_iter:  # the chains, queued at once
        raise InputError(f"n_iter must be between 1 and {served.limits.max_n_iter}, got {body.n_iter}")
    body = cells.fix_seeds(body)
    chains = await cells.side_by_side(chain(request, body, loopback, number) for number in range(body.n_iter))
    jobs = [job for loops, _ in chains for job in loops]
    shown = jobs if body.n_iter == 1 else [loops[-1] for loops, _ in chains if loops]
    if not shown:  # interrupted in every chain's first loop: no image, as AUTOMATIC1111 answers
        return cells.nothing_made(request, body, chains[0][1])
    images = [(job.images[0], job.infos[0]) for job in shown]
    grid = await run_in_threadpool(image_grid, [image for image, _ in images], 1) if len(images) > 1 else None
    await cells.save(request, body, kind, jobs, grid, images[0][1], "grid")
    grid = grid if grid is not None and outputs_of(request, body).return_grid else None  # (saved either way)
    details = cells.details(jobs[0], [info for _, info in images], before=(images[0][1],) if grid is not None else (),
                            jobs=[last for _, last in chains])
    details["extra_generation_params"] |= {"Final denoising strength": loopback.final,
                                           "Denoising curve": loopback.curve}
    details["loopback"] = {"loops": len(jobs), "chains": body.n_iter,
                           "seconds": round(time.time() - jobs[0].created, 3)}
    return await cells.answer(request, body, ([(grid, images[0][1])] if grid is not None else []) + images, details)
