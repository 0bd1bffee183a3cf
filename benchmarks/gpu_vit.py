"""The GPU check's ViT phases (benchmarks/gpu_check.py): ViT-B/16 served through Triton and in process.

Every import that needs more than numpy is inside a phase, as in benchmarks/gpu_phases.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.gpu_phases import execute_split, failure, rate, served_session, sync, timed
from kiln import contract as names

if TYPE_CHECKING:
    from benchmarks.gpu_check import Check


def _vit_inputs(check: Check):
    """The ViT the build served (check.vit_source) and the sample photographs through its eval transform, tiled to the
    largest batch: as float32 pixel_values, as uint8 pixels (resized and cropped, a quarter of the bytes) and as JPEG
    bytes."""
    from build.vit.transform import eval_transform
    from build.vit.weights import load_vit
    from kiln.imaging import preprocess
    from kiln.paths import SAMPLE_IMAGES, list_images

    batches = check.options.vit_batches
    model = load_vit(**check.vit_source(), seed=0).model
    transform = eval_transform(model)
    payloads = [p.read_bytes() for p in list_images(SAMPLE_IMAGES) if p.suffix.lower() in (".jpg", ".jpeg")]
    raw = np.stack([preprocess(payloads[i % len(payloads)], transform, scaled=False) for i in range(max(batches))])
    jpegs = np.array([payloads[i % len(payloads)] for i in range(max(batches))], dtype=object).reshape(-1, 1)
    return model, transform.normalize(raw), raw, jpegs


def vit_served(check: Check) -> dict:
    """Through Triton: tensors to `vit` (through system shared memory: float32 pixel_values, and uint8 pixels, a
    quarter of the bytes, which the model scales) and JPEG bytes to `vit_classify`, one client, with Triton's own
    split of each request's time per model; then, at the largest batch, tensors from several clients at once (the
    client's copies overlap the GPU's work, as a loaded server's do; with two copies of `vit`, the build's default on
    a GPU, one copy's host work overlaps the other's compute), float32 and uint8; and uint8 from a client's CUDA shared
    memory (on a GPU); and JPEGs again with vit_preprocess decoding with torch (nvJPEG on a GPU)."""
    from benchmarks.sd_triton import triton_compute_seconds
    from build.report import read_report
    from kiln.triton_client import TritonClient

    options, batches = check.options, check.options.vit_batches
    _, pixels, raw, jpegs = _vit_inputs(check)
    models = (names.VIT_PREPROCESS, names.VIT, names.VIT_POSTPROCESS)

    def measured(call) -> tuple[list[float], dict]:
        call()  # the warm-up outside the statistics' window
        before = triton_compute_seconds(check.server.http_url, models=models)
        latencies = timed(call, options.seconds)
        return latencies, _per_request(before, triton_compute_seconds(check.server.http_url, models=models))

    client = TritonClient(check.server.grpc_url, shared_memory="auto")
    rows = {}
    try:
        for batch in batches:
            arms = {}
            for arm, feed in (("triton_tensor", {"pixel_values": pixels[:batch]}),
                              ("triton_uint8", {"pixels": raw[:batch]})):
                latencies, split = measured(lambda feed=feed, batch=batch: client.infer(
                    names.VIT, feed, ["logits"], output_shapes={"logits": (batch, 1000)}))
                arms[arm] = rate(latencies, batch) | {"triton_ms_per_request": split}
            jpeg, jpeg_split = measured(lambda batch=batch: client.infer(
                names.VIT_CLASSIFY, {"image": jpegs[:batch]}, ["labels"]))
            rows[batch] = arms | {"triton_jpeg": rate(jpeg, batch) | {"triton_ms_per_request": jpeg_split}}
    finally:
        client.close()
    largest = max(batches)
    instances = read_report(check.repo)["vit"]["served"]["instances"]  # copies of vit: the concurrent arms' overlap
    return {"instances": instances, "batches": rows,
            "concurrent": alone(_vit_concurrent, check, {"pixel_values": pixels[:largest]}),
            "concurrent_uint8": alone(_vit_concurrent, check, {"pixels": raw[:largest]}),
            "cuda_shm_uint8": alone(_vit_cuda_shm, check, raw[:largest]),
            "execute_split": alone(execute_split, check, names.VIT),
            "concurrent_uint8_other_instances": alone(_other_instances, check, {"pixels": raw[:largest]}, instances),
            "jpeg_torch_decode": alone(_torch_decode, check, jpegs[:largest], raw[:largest])}


def _other_instances(check: Check, feed: dict[str, np.ndarray], instances: int) -> dict:
    """The concurrent uint8 arm again with `vit` reloaded at another instance count (two where the build gave one,
    one where it gave more): what its copies' overlap is worth, measured in the same run. `vit` stays reloaded."""
    from kiln.triton_client import TritonClient

    other = 2 if instances == 1 else 1
    client = TritonClient(check.server.grpc_url)
    try:
        config = client.model_config(names.VIT)
        for group in config["instance_group"]:
            group["count"] = other
        started = time.perf_counter()
        client.load_model(names.VIT, config)  # Triton's explicit model control (serve)
        reload_s = time.perf_counter() - started
        loaded = client.model_config(names.VIT)["instance_group"][0]["count"]
    finally:
        client.close()
    if loaded != other:
        raise RuntimeError(f"vit reloaded with {loaded} instances, not {other}")
    return {"instances": other, "reload_s": round(reload_s, 2)} | _vit_concurrent(check, feed)


def _torch_decode(check: Check, jpegs: np.ndarray, raw: np.ndarray) -> dict:
    """vit_classify's JPEG arm at the largest batch again, with vit_preprocess reloaded to decode with torchvision
    (kiln build vit --decode torch: on a GPU, nvJPEG there, and the pixels handed to `vit` there), and the pixels it
    hands on against PIL's. vit_preprocess stays reloaded."""
    from kiln.triton_client import TritonClient

    client = TritonClient(check.server.grpc_url)
    try:
        config = client.model_config(names.VIT_PREPROCESS)
        config["parameters"]["decode"] = {"string_value": "torch"}
        if check.options.cuda:
            for group in config["instance_group"]:
                group |= {"kind": "KIND_GPU", "gpus": [0]}
        started = time.perf_counter()
        client.load_model(names.VIT_PREPROCESS, config)  # Triton's explicit model control (serve)
        reload_s = time.perf_counter() - started
        pixels = client.infer(names.VIT_PREPROCESS, {"image": jpegs}, ["pixels"])["pixels"]
        latencies = timed(lambda: client.infer(names.VIT_CLASSIFY, {"image": jpegs}, ["labels"]),
                          check.options.seconds)
    finally:
        client.close()
    return {"reload_s": round(reload_s, 2), "kind": config["instance_group"][0]["kind"],
            "pixels_max_abs_levels_vs_pil": int(np.abs(pixels.astype(int) - raw.astype(int)).max())} | \
        rate(latencies, len(jpegs))


def alone(arm, *args) -> dict:
    """An extra arm of a phase: its figures, or what stopped it, without losing the phase's other figures."""
    try:
        return arm(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the phase's figures
        return failure(exc)


def _per_request(before: dict, after: dict) -> dict:
    """Triton's milliseconds per request of each model between two statistics snapshots (queue, compute input,
    infer, output), and the requests and executions counted."""
    out = {}
    for model, now in after.items():
        then = before.get(model, {})
        requests = now["requests"] - then.get("requests", 0)
        if requests:
            out[model] = {k.removesuffix("_s") + "_ms": round(1e3 * (v - then.get(k, 0)) / requests, 3)
                          for k, v in now.items() if k.endswith("_s")}
            out[model] |= {"requests": requests, "executions": now["executions"] - then.get("executions", 0)}
    return out


def _vit_concurrent(check: Check, feed: dict[str, np.ndarray]) -> dict:
    """`vit_clients` clients, each with its own shared-memory regions, sending the largest batch back to back."""
    from kiln.triton_client import TritonClient

    batch = len(next(iter(feed.values())))
    clients = [TritonClient(check.server.grpc_url, shared_memory="auto") for _ in range(check.options.vit_clients)]
    try:
        return _concurrently(check, batch, [lambda c=c: c.infer(names.VIT, feed, ["logits"], output_shapes={
            "logits": (batch, 1000)}) for c in clients])
    finally:
        for client in clients:
            client.close()


def _vit_cuda_shm(check: Check, raw: np.ndarray) -> dict:
    """The largest uint8 batch from a client's CUDA shared memory: put on the GPU and registered with Triton once (as
    perf_analyzer's --shared-memory=cuda does: a client whose images are on the GPU already), so that `vit` takes it
    there through DLPack (its config's FORCE_CPU_ONLY_INPUT_TENSORS "no"), with no copy through the host on the way
    in; the logits come back over gRPC. One client, then `vit_clients` at once; the logits are compared with the
    same batch's through system shared memory."""
    if not check.options.cuda:
        return {"not_run": "CUDA shared memory: on a GPU only"}
    import base64

    import torch
    import tritonclient.grpc as grpc

    from kiln.triton_client import GRPC_CHANNEL_ARGS, TritonClient

    batch, region = len(raw), "kiln_gpu_check_pixels"
    pixels = torch.from_numpy(raw).to("cuda:0")
    torch.cuda.synchronize()
    # the CUDA IPC handle of the allocation that holds it, and where in it the batch starts (torch's caching allocator)
    device, handle, _, offset, *_ = pixels.untyped_storage()._share_cuda_()
    # each its own connection (GRPC_CHANNEL_ARGS's local subchannel pool), as perf_analyzer's clients: in gRPC's
    # process-wide pool they would share one
    clients = [grpc.InferenceServerClient(check.server.grpc_url, channel_args=list(GRPC_CHANNEL_ARGS))
               for _ in range(check.options.vit_clients)]
    registered = False
    try:
        clients[0].register_cuda_shared_memory(region, base64.b64encode(handle), device, offset + raw.nbytes)
        registered = True

        def call(client) -> np.ndarray:
            given = grpc.InferInput("pixels", list(raw.shape), "UINT8")
            given.set_shared_memory(region, raw.nbytes, offset=offset)
            return client.infer(names.VIT, [given], outputs=[grpc.InferRequestedOutput("logits")]).as_numpy("logits")

        host = TritonClient(check.server.grpc_url, shared_memory="auto")
        try:
            reference = host.infer(names.VIT, {"pixels": raw}, ["logits"])["logits"]
        finally:
            host.close()
        one = rate(timed(lambda: call(clients[0]), check.options.seconds), batch)
        return {"batch": batch, "one_client": one,
                "vs_system_shm_max_abs_diff": float(np.abs(call(clients[0]) - reference).max())} | \
            _concurrently(check, batch, [lambda c=c: call(c) for c in clients])
    finally:
        if registered:
            clients[0].unregister_cuda_shared_memory(region)
        for client in clients:
            client.close()


def _concurrently(check: Check, batch: int, calls: list) -> dict:
    """Each of `calls` (one a client) on its own thread, back to back for the check's seconds after a warm-up each:
    the images per second of them all."""
    options = check.options
    patience = options.seconds + 120  # a warm-up or a call stuck past this fails the arm instead of hanging the run
    counts, ends = [0] * len(calls), [0.0] * len(calls)
    ready = threading.Barrier(len(calls) + 1, timeout=patience)
    failures: list[BaseException] = []

    def send(index: int) -> None:
        try:
            calls[index]()  # warm-up: its regions
            ready.wait()
            until = time.perf_counter() + options.seconds
            while time.perf_counter() < until:
                calls[index]()
                counts[index] += 1
            ends[index] = time.perf_counter()
        except BaseException as exc:  # noqa: BLE001 - the arm fails with it, below; the others stop waiting
            failures.append(exc)
            ready.abort()

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(calls))]
    try:
        for thread in threads:
            thread.start()
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass  # a client failed its warm-up: reported below
        start = time.perf_counter()
        for thread in threads:
            thread.join(patience)
        if failures:
            raise failures[0]
        if any(thread.is_alive() for thread in threads):
            raise TimeoutError(f"a client's call took over {patience:.0f} s")
        wall = max(ends) - start
    finally:
        ready.abort()  # an interrupted run leaves no thread waiting
    return {"clients": len(calls), "batch": batch, "requests": sum(counts),
            "images_per_s": round(batch * sum(counts) / wall, 1)}


def vit_in_process(check: Check) -> dict:
    """torch itself on the same images: eager fp16 (fp32 on the CPU) at every batch, and torch.compile with CUDA
    graphs (mode reduce-overhead) at the largest, as long as the time budget allows."""
    import torch

    options, batches = check.options, check.options.vit_batches
    model, pixels, raw, _ = _vit_inputs(check)
    device, dtype = ("cuda", torch.float16) if options.cuda else ("cpu", torch.float32)
    model = model.to(device, dtype).eval()
    rows = _torch_arms(check, model, pixels, device, dtype)
    del model  # the GPU's memory (the compiled arm's graphs went with _torch_arms) for the served artifact's session
    served = check.result["phases"].get("vit_served", {}).get("batches", {}).get(max(batches), {})
    ratio = {"host_copy_ms_at_max_batch": alone(_host_copies, pixels[:max(batches)], raw[:max(batches)], device,
                                                dtype, options.seconds),
             "kiln_session": alone(_session, check, pixels, raw)}
    if served:
        ratio["served_over_eager_at_max_batch"] = round(
            served["triton_tensor"]["images_per_s"] / rows[max(batches)]["eager"]["images_per_s"], 3)
    return {"batches": rows} | ratio


def _torch_arms(check: Check, model, pixels: np.ndarray, device: str, dtype) -> dict:
    """images/s of torch itself at each batch: eager, and compiled at the largest while the budget allows."""
    import torch

    options, batches = check.options, check.options.vit_batches
    rows: dict = {batch: {} for batch in batches}
    arms = [("eager", model, batches)]
    if options.compiled:
        arms.append(("compiled", torch.compile(model, mode="reduce-overhead"), (max(batches),)))
    for arm, module, sizes in arms:
        for batch in sizes:
            if arm == "compiled" and check.elapsed() > options.budget_s * 0.8:
                rows[batch][arm] = {"skipped": "time budget"}
                continue
            x = torch.from_numpy(pixels[:batch]).to(device, dtype)

            def call(x=x, module=module) -> None:
                with torch.inference_mode():
                    module(x)
                sync()
            rows[batch][arm] = rate(timed(call, options.seconds), batch)
    return rows


def _host_copies(pixels: np.ndarray, raw: np.ndarray, device: str, dtype, seconds: float) -> dict:
    """p50 ms of the ways a served model can take a float32 batch from host memory to the device in its dtype: cast
    on the host then copy (torch casts before a host-to-device copy; kiln.runtime.torch_session's way until
    2026-12-04, and still for inputs under 1 MB), copy then cast on the device, and through a pinned staging buffer
    (its way now for larger inputs); and the same batch as uint8 pixels through a pinned buffer, scaled on the device
    (kiln.runtime.ByteScale's way)."""
    import torch

    host, host_raw = torch.from_numpy(pixels), torch.from_numpy(raw)
    ways = {"cast_on_host": lambda: host.to(device, dtype), "cast_on_device": lambda: host.to(device).to(dtype)}
    if device == "cuda":
        pinned, pinned_raw = torch.empty_like(host).pin_memory(), torch.empty_like(host_raw).pin_memory()
        ways["pinned"] = lambda: pinned.copy_(host).to(device, non_blocking=True).to(dtype)
        # (the stock ViT's mean and std, 0.5: the cost is the same for any)
        ways["uint8_pinned_scaled"] = lambda: ((pinned_raw.copy_(host_raw).to(device, non_blocking=True).float()
                                                / 255.0 - 0.5) / 0.5).to(dtype)
    out = {}
    for name, way in ways.items():
        def call(way=way) -> None:
            way()
            sync()
        out[name] = round(1e3 * float(np.median(timed(call, seconds / 2))), 3)
    return out


def _session(check: Check, pixels: np.ndarray, raw: np.ndarray) -> dict:
    """The served `vit`'s own artifact in this process, through kiln's Session as the Triton model opens it (its CUDA
    graphs too) and with numpy in and out as there: what the served model's compute costs without Triton, so the
    served figures' gap splits into Triton's share and the session's (host copies, casts, the graph or eager run)."""
    from kiln.model_config import read_parameters

    session = served_session(check.repo / names.VIT)
    layer = int(read_parameters(check.repo / names.VIT / "config.pbtxt")[0]["default_layer"])
    def feed(images: np.ndarray) -> dict:  # uint8 pixels go in as pixel_values too (the vit model's prepare)
        return {"pixel_values": images, "layer": np.full((len(images), 1), layer, dtype=np.int64)}

    rows = {}
    for batch in sorted({1, len(pixels)}):
        inputs = feed(pixels[:batch])
        rows[batch] = rate(timed(lambda f=inputs: session.run(f, ["logits"]), check.options.seconds / 2), batch)
        # whether this shape replays a CUDA graph (torch on CUDA) or runs op by op
        rows[batch]["graph"] = session.replays_graph(inputs)
    uint8 = feed(raw)
    rows[f"{len(raw)}_uint8"] = rate(timed(lambda: session.run(uint8, ["logits"]), check.options.seconds / 2),
                                     len(raw))
    # The first and last images' logits from the largest batch (on CUDA through pinned staging:
    # kiln.runtime.torch_session) against each image's own call (too small to stage): another kernel's rounding, or
    # a staging fault if large
    batched = session.run(feed(pixels), ["logits"])["logits"]
    alone_ = [session.run(feed(pixels[i:i + 1]), ["logits"])["logits"][0] for i in (0, len(pixels) - 1)]
    # uint8 scaled by the session (on CUDA, on the device): the same floats, so 0 unless a kernel differs
    scaled = session.run(uint8, ["logits"])["logits"]
    return {"runtime": session.options.runtime, "artifact": Path(session.options.path).name, "batches": rows,
            "compile_s": round(session.compile_s, 1),  # torch.compile at open (kiln build vit --torch-compile)
            "batch_vs_alone_max_abs_diff": float(max(np.abs(batched[i] - a).max()
                                                     for i, a in zip((0, -1), alone_))),
            "uint8_vs_float32_max_abs_diff": float(np.abs(scaled - batched).max())}
