"""The GPU check's UNet phase (benchmarks/gpu_check.py): what one denoising call costs at each row count.

The served UNet's own artifact in this process, opened by kiln's Session as the Triton model opens it (its CUDA
graphs at the build's row buckets), fed numpy at the build's optimal image size: milliseconds per call and per row at
each bucket (2, 4, 8, 16 rows: one request with CFG, and the step batcher's merges) and at 3 rows, which no graph
holds: op by op until 2026-12-04's run, now replayed from the 4-row graph, padded (kiln.runtime.torch_session).
Milliseconds per row that stay flat as rows grow mean the GPU is already busy at 2 rows, and merging requests' steps
can save only what a call costs outside its kernels; milliseconds per row that fall are the step batcher's gain there.

For a torch.export program (torch-cuda-fp16), a second arm opens it in the other layout of its weights
(SessionOptions.channels_last: NHWC convolutions, which cuDNN's float16 tensor-core kernels prefer; the build serves
the UNet channels-last by default, `kiln build sd --layout`): the figures that say which layout it should serve.
A third arm compiles it with torch.compile before capturing its graphs (SessionOptions.torch_compile; uncompiled
where the build compiled it, `kiln build sd --torch-compile`): the compile's seconds and what its kernels save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from benchmarks.gpu_phases import failure, served_session, timed
from kiln import contract as names

if TYPE_CHECKING:
    from benchmarks.gpu_check import Check

BETWEEN_BUCKETS = 3  # rows no CUDA graph holds: the session pads them to the next bucket's


def unet_rows(check: Check) -> dict:
    from build.sd import ImageRange
    from build.sd.specs import sd_specs
    from build.sd.weights import load_sd
    from kiln.contract import read_sd_contract, read_served

    options = check.options
    spec = sd_specs(load_sd(check.weights), ImageRange(*options.images))["unet"]
    folder = check.repo / names.SD_UNET
    served = read_served(folder / "config.pbtxt")
    buckets = read_sd_contract(check.repo).row_buckets or (2, 4)  # the CPU has no graphs: two row counts, the trend
    rows = tuple(sorted({*buckets, BETWEEN_BUCKETS}))
    feeds = {n: spec.sample_inputs(0, batch=n) for n in rows}
    arms = {"served": {}}
    served_nhwc, program = served.channels_last == "1", served.runtime == "torch" and "aoti" not in served.artifact
    served_compiled = served.torch_compile == "1"
    if program:  # a torch.export program: the other layout of its weights too, and compiled (or not)
        arms["contiguous" if served_nhwc else "channels_last"] = {"channels_last": not served_nhwc}
        if served.gpu and (options.compiled or served_compiled):
            arms["uncompiled" if served_compiled else "compiled"] = {"torch_compile": not served_compiled}
    result: dict = {"runtime": served.runtime, "artifact": served.artifact, "buckets": list(buckets),
                    "size": options.images[1]}
    for arm, extra in arms.items():
        try:
            session = served_session(folder, **extra)
            if session.compile_s:  # torch.compile's first call at the first bucket, and the others' first calls
                result["compile_s"] = round(session.compile_s, 1)
            result[arm] = _time_rows(session, feeds, options.seconds)
        except Exception as exc:  # noqa: BLE001 - an arm fails alone; the phase keeps the other's figures
            result[arm] = failure(exc)
    result["served_layout"] = ("channels_last" if served_nhwc else "contiguous") if program else "its own"
    if program and not served.gpu:
        result["compiled"] = {"not_run": "torch.compile compiles what a CUDA graph captures: on a GPU only"}
    compiled, uncompiled = (result["served"], result.get("uncompiled", {})) if served_compiled else \
        (result.get("compiled", {}), result["served"])
    if _timed(compiled) and _timed(uncompiled):
        result["compiled_speedup"] = {n: round(uncompiled[n]["ms_per_call"] / compiled[n]["ms_per_call"], 3)
                                      for n in uncompiled}
    nhwc, plain = (result["served"], result.get("contiguous", {})) if served_nhwc else \
        (result.get("channels_last", {}), result["served"])
    if _timed(nhwc) and _timed(plain):
        result["channels_last_speedup"] = {n: round(plain[n]["ms_per_call"] / nhwc[n]["ms_per_call"], 3)
                                           for n in plain}
    return result


def _timed(arm: dict) -> bool:
    return bool(arm) and "error" not in arm and "not_run" not in arm


def _time_rows(session, feeds: dict, seconds: float) -> dict:
    out = {}
    for n, feed in feeds.items():
        latencies = timed(lambda feed=feed: session.run(feed), seconds / len(feeds), min_calls=3)
        ms = 1e3 * float(np.median(latencies))
        out[n] = {"ms_per_call": round(ms, 3), "ms_per_row": round(ms / n, 3), "graph": session.replays_graph(feed),
                  "calls": len(latencies)}
    return out
