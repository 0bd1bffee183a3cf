"""Triton Python-backend models: the one that serves a built artifact, and what hand-written ones share.

Every runtime model of the repository (vit, sd_text_encoder, sd_unet, sd_vae_decoder, ...) is
`RuntimeModel` (the build writes its thin model.py from one template), configured by its config.pbtxt
parameters (runtime, artifact, inference_precision, threads). Requests of one execute() call whose
shapes agree run as one batch; if a batch fails, its requests are retried one by one so that only
the bad one gets an error. Outputs are computed only when some request asks for them. A model with a `lora`
input (the text encoder, the UNets) runs each request on its LoRA set's session (kiln.runtime.lora), and requests
of different sets never share a batch. Subclasses adapt inputs with `prepare`; hand-written models answer a bad
request with `error_response`. A torch model on a GPU takes its float and uint8 inputs where a client put them: from
CUDA shared memory, through DLPack, with no copy through the host (read_input).

Imported inside Triton's Python backend stub only (it needs `triton_python_backend_utils`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.errors import InputError, KilnError
from kiln.machine import cores
from kiln.runtime import ByteScale, Session, SessionOptions, model_config, ov_cache_dir, session_device


class RuntimeModel:
    timing = None  # KILN_EXECUTE_TIMING: a file that gets one JSON line per execute (diagnostics: where time goes)

    def initialize(self, args):
        config, self.params = model_config(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        # A KIND_GPU instance runs on the GPU Triton gave it (torch variants).
        device = session_device(self.params["runtime"], args.get("model_instance_kind") == "GPU",
                                self.params.get("graph_batches", ""), self.params.get("graph_shapes", ""),
                                int(args.get("model_instance_device_id", 0)), self.params.get("channels_last", ""),
                                self.params.get("torch_compile", ""))
        self.session = Session(SessionOptions(
            runtime=self.params["runtime"],
            path=version_dir / self.params["artifact"],
            inference_precision=self.params.get("inference_precision", "f32"),
            threads=int(self.params.get("threads", "0")),
            cache_dir=ov_cache_dir(Path(args["model_repository"]).parent) if self.params["runtime"] == "openvino"
            else None,
            ov_device=self.params.get("ov_device", "CPU"),
            static_shapes=self.params.get("static_shapes", ""),
            byte_inputs=ByteScale.parse(self.params.get("byte_inputs", "")) or None,  # uint8 pixels, scaled
            **device,
        ))
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.name = args["model_name"]
        # A model with a `lora` input runs each request on the session of its LoRA set (kiln.runtime.lora, imported
        # then only: the hand-written models import this module in NVIDIA's image, which has no LoRA)
        self.loras = None
        if "lora" in self.input_names:
            from kiln.runtime.lora import LoraSessions

            self.loras = LoraSessions(self.session)
        if os.environ.get("KILN_EXECUTE_TIMING"):
            self.timing = open(os.environ["KILN_EXECUTE_TIMING"], "a", buffering=1)  # open for the model's life
            torch = sys.modules.get("torch")  # loaded by a torch artifact's session only
            self._log_timing({"event": "initialize", "cpus": cores(),
                              "torch_threads": torch.get_num_threads() if torch else None})

    def _log_timing(self, record: dict) -> None:
        try:
            self.timing.write(json.dumps({"model": self.name, "pid": os.getpid()} | record) + "\n")
        except (OSError, TypeError, ValueError) as exc:  # diagnostics never fail a request: say so once, stop
            print(f"{self.name}: KILN_EXECUTE_TIMING stopped: {exc}", file=sys.stderr)  # to Triton's log
            self.timing = None

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | str:
        """Adapt one request's inputs to the artifact's, or return an error message for that request."""
        for name, value in inputs.items():  # (a GPU session checks on the GPU: its inputs may be torch tensors there)
            if not self.session.checks_finite and value.dtype.kind == "f" and not np.isfinite(value).all():
                return f"{name} contains NaN or infinity"
        return inputs

    def execute(self, requests):
        started = time.perf_counter()
        feeds, specs = [], []
        for request in requests:
            inputs = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = read_input(tensor)
            specs.append(_lora_spec(inputs.pop("lora", None)))
            feeds.append(self.prepare(inputs) if specs[-1] is not None else "rows of one request name different "
                                                                            "LoRA sets")
        wanted = [list(r.requested_output_names()) or self.output_names for r in requests]
        results: list[dict | str | None] = [f if isinstance(f, str) else None for f in feeds]
        # What prepare refused (NaN, a layer out of range) and a LoRA set that cannot run: the request's fault
        refused = {i for i, (feed, spec) in enumerate(zip(feeds, specs)) if spec is None or isinstance(feed, str)}
        inputs_done = time.perf_counter()
        groups = self._groups(feeds, specs)
        for group in groups:
            try:
                session = self.loras.session(specs[group[0]]) if self.loras is not None else self.session
            except KilnError as exc:
                for i in group:
                    results[i] = str(exc)
                refused.update(group)
                continue
            self._run_group(group, feeds, wanted, results, session, refused)
        run_done = time.perf_counter()
        responses = []
        for i, outcome in enumerate(results):
            if isinstance(outcome, str):
                responses.append(error_response(f"{self.name}: {outcome}", invalid_arg=i in refused))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in outcome.items()]))
        if self.timing:
            done = time.perf_counter()
            rows = [len(next(iter(f.values()))) for f in feeds if not isinstance(f, str) and f and self.batching]
            # rows: 0 for a model without batching; the session's split: of one batch's run (none for several)
            self._log_timing({"event": "execute", "requests": len(requests), "rows": sum(rows),
                              "inputs_ms": round(1e3 * (inputs_done - started), 3),
                              "run_ms": round(1e3 * (run_done - inputs_done), 3),
                              "responses_ms": round(1e3 * (done - run_done), 3),
                              "session": self.session.last_split if len(groups) == 1 else None})
        return responses

    def _groups(self, feeds, specs) -> list[list[int]]:
        """Indices of valid requests, grouped so that each group can be concatenated along the batch axis (and
        shares a LoRA set)."""
        groups: dict[tuple, list[int]] = {}
        for i, (feed, spec) in enumerate(zip(feeds, specs)):
            if isinstance(feed, str):
                continue
            key = (spec, *sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in feed.items())) \
                if self.batching else (i,)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run_group(self, group, feeds, wanted, results, session, refused: set[int]) -> None:
        names = [n for n in self.output_names if any(n in wanted[i] for i in group)]
        try:
            if len(group) == 1:
                merged = feeds[group[0]]
            else:
                merged = {k: _concatenate([feeds[i][k] for i in group]) for k in feeds[group[0]]}
            outputs = session.run(merged, names)
            start = 0
            for i in group:
                count = len(next(iter(feeds[i].values()))) if self.batching else None
                results[i] = {n: (outputs[n][start:start + count] if count is not None else outputs[n])
                              for n in wanted[i]}
                start += count or 0
        except Exception as exc:  # noqa: BLE001 - a batch-level failure: retry alone so only the culprit fails
            if len(group) == 1 and isinstance(exc, InputError):  # the request's fault, found by the session (NaN
                results[group[0]] = str(exc)                        # on a GPU is checked there): a 400, not a 500
                refused.add(group[0])
                return
            if len(group) == 1:
                results[group[0]] = f"inference failed: {_short_error()}"
                return
            for i in group:
                self._run_group([i], feeds, wanted, results, session, refused)


def read_input(tensor):
    """A request's input as the session takes it: numpy from host memory; from a GPU (a client's CUDA shared memory,
    which Triton hands a model whose config sets FORCE_CPU_ONLY_INPUT_TENSORS to "no": the torch CUDA models) a torch
    tensor on that GPU through DLPack, with no copy through the host (kiln.runtime.torch_session.from_gpu)."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    from kiln.runtime.torch_session import from_gpu  # a GPU tensor reaches a torch model only: torch is there

    return from_gpu(tensor)


def _concatenate(values: list):
    """Requests' inputs as one batch: numpy arrays, or torch tensors on a GPU (read_input; _groups never mixes the
    two: their dtypes are named apart)."""
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    from kiln.runtime.torch_session import concatenate

    return concatenate(values)


def _lora_spec(value: np.ndarray | None) -> str | None:
    """The LoRA spec a request's `lora` input carries ("" without one); None when its rows disagree."""
    if value is None:
        return ""
    specs = {v.decode() if isinstance(v, bytes) else str(v) for v in value.reshape(-1)}
    return specs.pop() if len(specs) == 1 else ("" if not specs else None)


def error_response(message: str, *, invalid_arg: bool = True):
    """A response carrying an error for one request. INVALID_ARG (the request's fault) reaches clients as gRPC
    INVALID_ARGUMENT / HTTP 400; without it, as a server error."""
    code = pb_utils.TritonError.INVALID_ARG if invalid_arg else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _short_error() -> str:
    import sys

    exc = sys.exc_info()[1]
    text = str(exc).splitlines()[0] if exc and str(exc) else type(exc).__name__
    return text[:500]
