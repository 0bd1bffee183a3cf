"""The torch runtime: a component exported by `torch.export` (`model.pt2`), or that program compiled ahead of time by
AOTInductor (`model-aoti*.pt2`, native code for one CPU ISA or for CUDA), run on the CPU or a CUDA device.

The one module of kiln that imports torch, and only when a torch artifact is opened (`Session` imports it lazily):
the Triton models and a serving install without torch never load it. The program carries its own graph (no
diffusers or timm at serving time) and, in `kiln.json` beside it in the archive, the names of its inputs and
outputs and the dtype it was exported in (float16 for the CUDA variant: float inputs are cast to it on the way in,
outputs back to float32 on the way out, so the wire stays FP32), the torch release that exported it and, for a
package, what it was compiled for: a file another release or another CPU cannot run is refused with the reason.

On CUDA, `graph_batches` names batch sizes whose calls replay a CUDA graph captured at load time (at `graph_sizes`,
the build's optimal sizes): one launch instead of hundreds for a denoising step. A call with fewer rows at the same
sizes replays the next graph when that adds at most 8 rows, padded with copies of its last row, which are dropped
from the outputs: what Triton's batcher merges rarely lands on a bucket, and op by op is launch-bound (an H200 ran
SD 1.5's UNet at 3 rows in 37.8 ms, at 4 rows from its graph in 17.8 ms: about 23 ms of launches, some 7 of its
rows; a ViT row costs about 0.1 ms there, against some 3 ms of launches). Any other shape runs eagerly.

A float32 or uint8 input of 1 MB or more reaches the GPU through a pinned staging buffer (a ViT batch, not a UNet
step's latents); uint8 pixels of an input named in `byte_inputs` are scaled to the program's floats there. An input
that is already a torch tensor (on a GPU: a client's CUDA shared memory, kiln.runtime.model.read_input) is cast or
scaled where it is, with no copy through the host.
`channels_last` stores a program's 4-d weights channels-last (NHWC): a convolution with such a weight computes and
returns channels-last, so the layout carries through a UNet or a VAE, as cuDNN's float16 tensor-core kernels want.
`torch_compile` compiles a program's graph with torch.compile (Inductor's fused kernels; batch sizes symbolic, so one
compile serves every bucket of 2 rows or more, and a bucket of 1, which torch specializes, one more) before its CUDA
graphs are captured: a capture then replays those kernels. Calls no graph holds run the program as exported, never
a compile at request time. The compile's seconds are in compile_s.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from kiln.errors import ConfigError, InputError
from kiln.runtime import pad_rows
from kiln.runtime.programs import METADATA, read_metadata, release


def save(program, path: Path, inputs: Mapping[str, str], outputs: Sequence[str], dtype: str, device: str) -> None:
    """Write an ExportedProgram with what the runtime needs: `inputs` {name: torch dtype name} in call order, the
    outputs' names, the dtype its floats compute in and the device it was exported on."""
    torch.export.save(program, str(path), extra_files={METADATA: json.dumps(
        {"inputs": dict(inputs), "outputs": list(outputs), "dtype": dtype, "device": device,
         "torch": release(torch.__version__)})})


def write_package_metadata(package: Path, program_metadata: dict, device: str) -> None:
    """Add the runtime's metadata to an AOTInductor package: the program's, plus what it was compiled for."""
    import zipfile

    from torch._inductor.cpu_vec_isa import pick_vec_isa

    meta = dict(program_metadata, compiler="aoti", device=device,
                cpu_isa=str(pick_vec_isa()) if device == "cpu" else "", cuda_capability=cuda_capability(device))
    with zipfile.ZipFile(package) as archive:
        prefix = archive.namelist()[0].split("/")[0]
    with zipfile.ZipFile(package, "a") as archive:
        archive.writestr(f"{prefix}/extra/{METADATA}", json.dumps(meta))


def cuda_capability(device: str | torch.device) -> str:
    """"9.0" for an H100/H200: AOTInductor's CUDA kernels are built for one architecture ("" on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ""
    return ".".join(str(v) for v in torch.cuda.get_device_capability(device))


def check_loadable(path: Path, device: torch.device) -> dict:
    """The file's metadata; refuse a program exported by another torch release (torch.export's archive format is not
    stable across releases: a program is built with the torch that serves it) and a package compiled for vector
    instructions this CPU lacks (AVX-512 code on an AVX2-only CPU), for another GPU architecture, or for the other
    kind of device."""
    meta = read_metadata(path)
    built_for = meta.get("device", "cpu")
    if built_for != device.type and (meta.get("compiler") or built_for == "cuda"):
        raise ConfigError(f"{path}: built for {built_for} and opened on {device.type}: build the variant for the "
                          "device that serves it (--device gpu for CUDA)")
    if meta.get("cuda_capability") and meta["cuda_capability"] != cuda_capability(device):
        raise ConfigError(f"{path}: compiled for CUDA compute capability {meta['cuda_capability']}, and this GPU has "
                          f"{cuda_capability(device)}: build it on the kind of GPU that serves")
    exported = meta.get("torch", "unknown")
    if exported != release(torch.__version__):
        raise ConfigError(f"{path}: exported by torch {exported}, and this is torch {torch.__version__}: build the "
                          "torch variants with the torch that serves them")
    if meta.get("cpu_isa"):
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        here = [str(isa) for isa in valid_vec_isa_list()]
        if meta["cpu_isa"] not in here:
            raise ConfigError(f"{path}: compiled by AOTInductor for {meta['cpu_isa']}, which this CPU lacks (it has "
                              f"{', '.join(here) or 'no vector ISA torch knows'}): build it on the machine that serves")
    return meta


def rows_symbolic(tensors) -> None:
    """Mark the rows (dimension 0) of a torch.compile'd call's inputs symbolic: that call's compile then serves every
    row count (without, the second count compiles again, and torch only then makes the rows dynamic)."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


MAX_PAD_ROWS = 8  # the most rows a call is padded by to replay a CUDA graph (graph_bucket)


def graph_bucket(key: tuple, captured) -> tuple | None:
    """The captured shapes (`key`s: each input's shape, in input order) a call at `key` can replay padded: every input
    with the same rows, the same other dimensions, and the fewest rows above the call's, at most MAX_PAD_ROWS more
    (past that, the padding's compute costs more than the launches it saves)."""
    rows = {shape[0] for shape in key if shape}
    if len(rows) != 1 or not all(key):
        return None
    (n,) = rows
    fits = [k for k in captured if all(len(a) == len(b) and a[1:] == b[1:] for a, b in zip(k, key))
            and len({shape[0] for shape in k}) == 1 and n < k[0][0] <= n + MAX_PAD_ROWS]
    return min(fits, key=lambda k: k[0][0], default=None)


# What a torch session casts or scales on its device: inputs of these types stay on the GPU they came on
DEVICE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def from_gpu(tensor) -> torch.Tensor | np.ndarray:
    """A Triton input tensor on a GPU (kiln.runtime.model.read_input) as a torch tensor there, through DLPack; other
    types (indices such as the ViT's `layer`) come to the host as numpy, where the models read them."""
    from torch.utils.dlpack import from_dlpack

    value = from_dlpack(tensor.to_dlpack())
    return value if value.dtype in DEVICE_DTYPES else value.cpu().numpy()


def concatenate(values: list[torch.Tensor]) -> torch.Tensor:
    """Requests' tensors on a GPU as one batch (kiln.runtime.model)."""
    return torch.cat(values)


def _pad(value: np.ndarray | torch.Tensor, rows: int) -> np.ndarray | torch.Tensor:
    """pad_rows, for a torch tensor too (read_input's, on its GPU)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value[-1:].expand(rows - len(value), *value.shape[1:])])
    return pad_rows(value, rows)


class _Clock:
    """Milliseconds between laps, the device's queued work finished at each (diagnostics only: it waits)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.laps = device, {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name], self._last = round(1e3 * (now - self._last), 3), now


STAGED_BYTES = 1 << 20  # a float32 or uint8 input at least this large reaches a CUDA device through pinned memory
STAGED_DTYPES = (np.float32, np.uint8)


class _Staging:
    """Pinned host buffers, one per input, grown to the largest input seen. A batch is copied into one (torch's copy,
    on every core), then to the device without a wait, and cast or scaled there. An H200 took 6.1 ms this way for a
    256-image ViT batch in float32 (154 MB), against 12.0 ms cast on the host and copied from pageable memory (the GPU
    check's host copies); as uint8 pixels the batch is 38.5 MB."""

    def __init__(self, device: torch.device) -> None:
        self.device, self._buffers, self._lock = device, {}, threading.Lock()

    def to_device(self, name: str, value: np.ndarray) -> torch.Tensor:
        """`value` on the device, in its own dtype."""
        with self._lock:
            buffer, copied = self._buffers.get(name, (None, None))
            if buffer is None or buffer.numel() < value.nbytes:  # a replaced buffer lives on until its copy is done
                buffer = torch.empty(value.nbytes, dtype=torch.uint8, pin_memory=True)  # (torch's host allocator)
            elif copied is not None:
                copied.synchronize()  # the last copy out of this buffer has finished before it is overwritten
            source = torch.from_numpy(value).reshape(-1)
            staged = buffer[:value.nbytes].view(source.dtype)
            staged.copy_(source)
            on_device = staged.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
            self._buffers[name] = (buffer, copied)
        return on_device.view(value.shape)


class TorchSession:
    # KILN_EXECUTE_TIMING set (kiln.runtime.model): each call's split into copy in, compute and copy out, in last_split
    timed = bool(os.environ.get("KILN_EXECUTE_TIMING"))
    last_split: dict | None = None

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0,
                 graph_batches: Sequence[int] = (), graph_shapes: Mapping[str, Sequence[int]] | None = None,
                 channels_last: bool = False, byte_inputs: Mapping | None = None, torch_compile: bool = False) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # graph capture and replay use the current device's streams
        meta = check_loadable(path, self.device)
        self.input_names, self.output_names = list(meta["inputs"]), list(meta["outputs"])
        self.dtype = getattr(torch, meta["dtype"])
        # Each input travels in the dtype it was exported with (floats in the program's, the timestep in float32).
        self._input_dtypes = {n: getattr(torch, d) for n, d in meta["inputs"].items()}
        self.compiled = meta.get("compiler", "")
        if self.compiled == "aoti":  # native code for the device it was compiled for, weights inside
            if channels_last:
                raise ConfigError(f"{path}: an AOTInductor package fixes its layouts when it is compiled; "
                                  "channels_last applies to torch.export programs")
            index = (self.device.index or 0) if self.device.type == "cuda" else -1
            # Single-threaded: AOTInductor's own thread hand-off does not mix with CUDA graph capture.
            self.module = torch._inductor.aoti_load_package(str(path), run_single_threaded=bool(graph_batches),
                                                            device_index=index)
        else:
            program = torch.export.load(str(path))
            if self.device.type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, self.device)
            self.module = program.module()
            if channels_last:
                for tensor in (*self.module.parameters(), *self.module.buffers()):
                    if tensor.dim() == 4:
                        tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        # uint8 pixels of these inputs are scaled as kiln.runtime.ByteScale says, on the device (after a 4x smaller
        # copy)
        self._scales = {name: (torch.tensor(s.mean, dtype=torch.float32, device=self.device).reshape(3, 1, 1),
                               torch.tensor(s.std, dtype=torch.float32, device=self.device).reshape(3, 1, 1))
                        for name, s in (byte_inputs or {}).items()}
        self._graphs: dict[tuple, tuple] = {}
        self._lock = threading.Lock()  # a captured graph has one set of static buffers
        self._staging = _Staging(self.device) if self.device.type == "cuda" else None
        graphs = self.device.type == "cuda" and bool(graph_batches and graph_shapes)
        self.torch_compile, self.compile_s = torch_compile, 0.0
        if torch_compile and (self.compiled or not graphs):
            raise ConfigError(f"{path}: torch_compile compiles what a CUDA graph captures: a torch.export program on a "
                              "GPU with the build's graph buckets" + (", not an AOTInductor package (compiled already)"
                                                                      if self.compiled else f", not on {device}"))
        captured = torch.compile(self.module) if torch_compile else self.module  # kernels; the graphs are ours
        for batch in graph_batches if graphs else ():
            self._capture(captured, {name: (batch, *graph_shapes[name][1:]) for name in self.input_names})

    @property
    def execution_precision(self) -> str:
        return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(self.dtype, "f32")

    def _key(self, inputs: Mapping[str, np.ndarray]) -> tuple:
        return tuple(tuple(np.shape(inputs[n])) for n in self.input_names)

    def _graph_key(self, key: tuple) -> tuple | None:
        """The captured shapes a call at `key` replays: its own, or a bucket it is padded to (graph_bucket)."""
        return key if key in self._graphs else graph_bucket(key, self._graphs)

    def replays_graph(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """Whether a call with these inputs replays a captured CUDA graph (at their shapes, or padded to a bucket)."""
        return self._graph_key(self._key(inputs)) is not None

    def _tensor(self, name: str, value: np.ndarray | torch.Tensor) -> torch.Tensor:
        dtype = self._input_dtypes[name]
        if isinstance(value, torch.Tensor):  # already a tensor (on a GPU: a client's CUDA shared memory, through
            tensor = value.to(self.device)   # DLPack, kiln.runtime.model.read_input): cast or scaled where it is
            scaled = name in self._scales and tensor.dtype == torch.uint8
        else:
            value = np.ascontiguousarray(value)
            scaled = name in self._scales and value.dtype == np.uint8
            if self._staging is not None and value.dtype in STAGED_DTYPES and value.nbytes >= STAGED_BYTES:
                tensor = self._staging.to_device(name, value)
            elif scaled:
                tensor = torch.from_numpy(value).to(self.device)
            else:  # a small input: cast on the host, then copied (half the bytes for float16)
                return torch.from_numpy(value).to(self.device, dtype)
        if scaled:  # kiln.imaging.normalize_pixels' operations, in its order: the same floats
            mean, std = self._scales[name]
            tensor = (tensor.to(torch.float32) / 255.0 - mean) / std
        return tensor.to(dtype)

    def _capture(self, module, shapes: dict[str, tuple]) -> None:
        static = {name: torch.zeros(shape, device=self.device, dtype=self._input_dtypes[name])
                  for name, shape in shapes.items()}
        if self.torch_compile:  # the first bucket's compile serves the others (but a row alone: torch specializes 1)
            rows_symbolic(static.values())
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for warm_up in range(2):  # warm up the allocator and kernels (and compile) before capturing
                started = time.perf_counter()
                module(*(static[n] for n in self.input_names))
                if self.torch_compile and warm_up == 0:
                    torch.cuda.synchronize(self.device)
                    self.compile_s += time.perf_counter() - started
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            outputs = module(*(static[n] for n in self.input_names))
        key = tuple(tuple(shapes[n]) for n in self.input_names)
        self._graphs[key] = (graph, static, outputs if isinstance(outputs, (tuple, list)) else (outputs,))

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self.output_names
        key, rows = self._key(inputs), None
        bucket = self._graph_key(key)
        if bucket is not None and bucket != key:  # padded to the bucket's rows; the outputs sliced back to `rows`
            rows, key = key[0][0], bucket
            inputs = {n: _pad(inputs[n], bucket[i][0]) for i, n in enumerate(self.input_names)}
        captured = self._graphs.get(key)
        # Triton may call execute on another thread than initialize's, whose current device set_device set.
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        clock = None
        if self.timed:  # a call that fails leaves no split of an earlier one behind
            clock, self.last_split = _Clock(self.device), None
        with torch.inference_mode(), on_device:
            tensors = {name: self._tensor(name, inputs[name]) for name in self.input_names}
            if self.checks_finite:
                self._check_finite(tensors)
            if clock:
                clock.lap("to_device_ms")
            if captured is not None:
                graph, static, outputs = captured
                with self._lock:
                    for name in self.input_names:
                        static[name].copy_(tensors[name])
                    graph.replay()
                    if clock:
                        clock.lap("compute_ms")
                    result = self._numpy(outputs, names)
                    if rows is not None:
                        result = {n: v[:rows] if v.ndim and len(v) == key[0][0] else v for n, v in result.items()}
            else:
                outputs = self.module(*(tensors[n] for n in self.input_names))
                if clock:
                    clock.lap("compute_ms")
                result = self._numpy(outputs if isinstance(outputs, (tuple, list)) else (outputs,), names)
        if clock:
            clock.lap("to_host_ms")
            self.last_split = clock.laps | {"graph": captured is not None, "padded_from": rows}
        return result

    @staticmethod
    def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
        """InputError naming the first float input with NaN or infinity; one wait for the GPU for them all."""
        floats = [name for name, tensor in tensors.items() if tensor.is_floating_point()]
        if floats:
            finite = torch.stack([torch.isfinite(tensors[name]).all() for name in floats]).tolist()
            for name, ok in zip(floats, finite):
                if not ok:
                    raise InputError(f"{name} contains NaN or infinity")

    @property
    def checks_finite(self) -> bool:
        """On a GPU the inputs are checked for NaN and infinity there, after the copy (a CPU pass over a batch of 256
        images costs more than the GPU's whole forward pass); RuntimeModel checks the others before the call."""
        return self.device.type == "cuda"

    def _numpy(self, outputs, names: Sequence[str]) -> dict[str, np.ndarray]:
        by_name = dict(zip(self.output_names, outputs))
        # contiguous: a channels-last program's outputs come back in that layout; numpy callers expect C order
        return {name: by_name[name].float().contiguous().cpu().numpy() if by_name[name].is_floating_point()
                else by_name[name].contiguous().cpu().numpy() for name in names}
