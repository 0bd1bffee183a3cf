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

The check's last phase, `unet_compiled`, opens it compiled by torch.compile before its graphs are captured
(SessionOptions.torch_compile; uncompiled where the build compiled it, `kiln build sd --torch-compile`): the
compile's seconds and what Inductor's kernels save at each bucket. Last, so that a long compile cannot keep the
target phases from running in a lent machine's time.
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
    from kiln.model_config import read_served

    folder, feeds = _unet_feeds(check)
    served = read_served(folder / "config.pbtxt")
    arms = {"served": {}}
    served_nhwc, program = served.channels_last == "1", _program(served)
    if program:  # a torch.export program: the other layout of its weights too
        arms["contiguous" if served_nhwc else "channels_last"] = {"channels_last": not served_nhwc}
    buckets = [n for n in feeds if n != BETWEEN_BUCKETS]
    result: dict = {"runtime": served.runtime, "artifact": served.artifact, "buckets": buckets,
                    "size": check.options.images[1]}
    for arm, extra in arms.items():
        try:
            result[arm] = _time_rows(served_session(folder, **extra), feeds, check.options.seconds)
        except Exception as exc:  # noqa: BLE001 - an arm fails alone; the phase keeps the other's figures
            result[arm] = failure(exc)
    result["served_layout"] = ("channels_last" if served_nhwc else "contiguous") if program else "its own"
    nhwc, plain = (result["served"], result.get("contiguous", {})) if served_nhwc else \
        (result.get("channels_last", {}), result["served"])
    if _timed(nhwc) and _timed(plain):
        result["channels_last_speedup"] = {n: round(plain[n]["ms_per_call"] / nhwc[n]["ms_per_call"], 3)
                                           for n in plain}
    return result


def unet_compiled(check: Check) -> dict:
    """The served UNet compiled by torch.compile in this process, against unet_rows' served figures (or, where the
    build compiled it, uncompiled against them): compile_s, ms per call at each bucket, compiled_speedup."""
    from kiln.model_config import read_served

    served = read_served(check.repo / names.SD_UNET / "config.pbtxt")
    if not (served.gpu and _program(served)):
        return {"not_run": "torch.compile compiles what a CUDA graph captures: a torch.export program on a GPU"}
    folder, feeds = _unet_feeds(check)
    compiled = served.torch_compile == "1"
    baseline = check.result["phases"].get("unet_rows", {}).get("served", {})
    session = served_session(folder, torch_compile=not compiled)
    result = {"served_compiled": compiled, **({} if compiled else {"compile_s": round(session.compile_s, 1)})}
    other = result["uncompiled" if compiled else "compiled"] = _time_rows(session, feeds, check.options.seconds)
    if _timed(baseline):
        fast, slow = ({str(n): row for n, row in arm.items()} for arm in ((baseline, other) if compiled else
                                                                            (other, baseline)))
        result["compiled_speedup"] = {n: round(slow[n]["ms_per_call"] / fast[n]["ms_per_call"], 3)
                                      for n in fast if n in slow}
    return result


def _unet_feeds(check: Check) -> tuple:
    """The served UNet's folder, and its inputs at each bucket and at BETWEEN_BUCKETS rows (the build's optimal
    size); made once a run (check.unet_feeds)."""
    from build.sd import ImageRange
    from build.sd.specs import sd_specs
    from build.sd.weights import load_sd
    from kiln.contract import read_sd_contract

    if check.unet_feeds is None:
        spec = sd_specs(load_sd(check.weights), ImageRange(*check.options.images))["unet"]
        buckets = read_sd_contract(check.repo).row_buckets or (2, 4)  # the CPU has no graphs: two counts, the trend
        check.unet_feeds = (check.repo / names.SD_UNET,
                            {n: spec.sample_inputs(0, batch=n) for n in sorted({*buckets, BETWEEN_BUCKETS})})
    return check.unet_feeds


def _program(served) -> bool:
    """Whether a ServedArtifact is a torch.export program (not an AOTInductor package, nor another runtime's)."""
    return served.runtime == "torch" and "aoti" not in served.artifact


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
