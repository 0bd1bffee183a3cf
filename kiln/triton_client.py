"""The one Triton client core: KServe v2 over gRPC or HTTP (tritonclient), numpy in and out, errors as ours.

Every call to Triton in this project goes through `TritonClient`: the SD components of the
orchestrator, the ViT client, the API's ViT routes and health checks. A Triton error becomes a
KilnError naming the model: INVALID_ARG (the model's verdict on the request) an InputError;
Triton away, restarting or without the model a ServerError; anything else a KilnError.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from kiln.errors import InputError, KilnError, ServerError, Unreachable, is_unreachable
from kiln.shared_memory import Registry, ThreadRegions, Unavailable

log = logging.getLogger("kiln.triton")

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
PROTOCOLS = tuple(DEFAULT_URLS)
_DTYPES = {"b": "BOOL", "u1": "UINT8", "i1": "INT8", "i4": "INT32", "i8": "INT64", "f2": "FP16", "f4": "FP32",
           "f8": "FP64"}  # numpy kind + itemsize -> Triton's wire dtype


def wire_dtype(array: np.ndarray) -> str:
    """Triton's dtype name for a numpy array (object arrays of bytes are BYTES)."""
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        return "BYTES"
    key = "b" if array.dtype.kind == "b" else f"{array.dtype.kind}{array.dtype.itemsize}"
    try:
        return _DTYPES[key]
    except KeyError:
        raise KilnError(f"no Triton dtype for numpy {array.dtype}") from None


SHARED_MEMORY = ("auto", "on", "off")


# Every gRPC channel to Triton, in one place. Keepalive pings find a dead peer under a call (a Triton pod gone
# without a FIN) in 30 + 10 s instead of the kernel's hours; messages have no size limit (an SDXL batch of latents
# and a 4096-pixel image exceed gRPC's 4 MB default); round_robin spreads the calls of one channel over every address
# a name resolves to, so `dns:///triton-headless:8001` (a Kubernetes headless Service) reaches every Triton pod
# instead of pinning one HTTP/2 connection to the first.
GRPC_CHANNEL_ARGS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Pings only while calls are open: Triton's defaults (--grpc-keepalive-permit-without-calls false, a 5-minute
    # minimum between idle pings) answer idle pings with GOAWAY
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.dns_min_time_between_resolutions_ms", 5_000),
    # Each channel its own connections: in gRPC's process-wide pool, a new channel to an address takes over the
    # connection state of older channels to it, so a Triton started on a port an earlier one had (a restarted pod,
    # or the kernel handing a free port out again) was refused at once ("Connection refused", a CI failure) while
    # an old channel waited out its reconnect backoff.
    ("grpc.use_local_subchannel_pool", 1),
    # A Triton back after an outage is reached within about 2 s: gRPC's own backoff between connection attempts grows
    # to 120 s (measured: 11.5 s to reach a server back after 30 s away), failing every call meanwhile
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
# How long a call that reached no Triton is sent again (every 0.1 s: each fails at once while the channel waits): a
# channel tries to connect again at most 2.4 s (the backoff above and gRPC's jitter) after it last failed, and each
# thread's channel backs off on its own (a probe that sees Triton back does not connect the generating thread's)
RECONNECT_WAIT_S = 3.0


def _is_local(url: str) -> bool:
    """Whether `url` (host:port, or gRPC's dns:///host:port) names this host: only then can Triton map our shared
    memory."""
    host = urlsplit(f"//{url.removeprefix('dns:///')}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class TritonClient:
    """A thread-safe client (one tritonclient connection per thread) for one Triton endpoint.

    `shared_memory`: "auto" (gRPC to a Triton on this host: tensors travel through Triton's system shared memory
    when Triton can map it, else over the network), "on" (shared memory or an error), "off".
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", *, timeout_s: float = 600.0,
                 shared_memory: str = "off") -> None:
        if protocol not in DEFAULT_URLS:
            raise KilnError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        if shared_memory not in SHARED_MEMORY:
            raise KilnError(f"unknown shared-memory mode {shared_memory!r}; valid: {', '.join(SHARED_MEMORY)}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self._local = threading.local()
        self.shared_memory_mode = shared_memory
        if shared_memory == "on" and protocol != "grpc":
            raise KilnError("shared memory is used over gRPC only")
        self._shared = protocol == "grpc" and (shared_memory == "on" or (
            shared_memory == "auto" and _is_local(self.url)))
        self.shared_memory_error: str | None = None  # why "auto" fell back to the network
        self._registry = Registry()
        atexit.register(self._registry.close)
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module

    def connection(self):
        """This thread's tritonclient InferenceServerClient."""
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.url, channel_args=list(GRPC_CHANNEL_ARGS))
            else:
                client = self._module.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                            network_timeout=self.timeout_s)
            self._local.client = client
        return client

    @property
    def uses_shared_memory(self) -> bool:
        return self._shared

    @property
    def shared_memory_regions(self) -> set[str]:
        """The names of this client's regions registered with Triton now."""
        return self._registry.names

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
              output_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
        """Run `model` on named arrays (dtype from numpy; bytes as object arrays) and return the named outputs.

        `output_shapes` (float32 outputs whose largest shape the caller knows) lets them come back through shared
        memory too; the others, and everything when shared memory is off, travel over the network.
        """
        return self._reconnecting(self._infer, model, inputs, outputs, output_shapes)

    def _reconnecting(self, call, *args):
        """call(*args); where it reached no Triton, again every 0.1 s for RECONNECT_WAIT_S: Triton may be back while
        this thread's channel waits out its backoff (a call then fails at once). Triton down: the error after that."""
        deadline = time.monotonic() + RECONNECT_WAIT_S
        while True:
            try:
                return call(*args)
            except Unreachable:
                if self.protocol != "grpc" or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
               output_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
        if self._shared and all(a.dtype != object for a in inputs.values()):
            try:
                return self._infer_shared(model, inputs, outputs, output_shapes or {})
            except Unavailable as exc:
                if self.shared_memory_mode == "on":
                    raise ServerError(f"Triton at {self.url} cannot map this process's shared memory: {exc}") \
                        from None
                self._shared, self.shared_memory_error = False, str(exc)
                log.warning("Triton at %s cannot map shared memory (%s): tensors go over the network", self.url, exc)
        tensors = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array) if array.dtype != object else array
            tensor = self._module.InferInput(name, list(array.shape), wire_dtype(array))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = self._call(model, tensors, [self._module.InferRequestedOutput(name) for name in outputs])
        return {name: result.as_numpy(name) for name in outputs}

    def _infer_shared(self, model, inputs, outputs, output_shapes) -> dict[str, np.ndarray]:
        regions = getattr(self._local, "regions", None)
        if regions is None:
            regions = self._local.regions = ThreadRegions(self.connection(), self._registry)
        arrays = {name: np.ascontiguousarray(a) for name, a in inputs.items()}
        region, offsets = regions.write_inputs(list(arrays.values()))
        tensors = []
        for (name, array), offset in zip(arrays.items(), offsets):
            tensor = self._module.InferInput(name, list(array.shape), wire_dtype(array))
            tensor.set_shared_memory(region.name, array.nbytes, offset=offset)
            tensors.append(tensor)
        shared = [n for n in outputs if n in output_shapes]
        sizes = [int(np.prod(output_shapes[n])) * 4 for n in shared]
        out_offsets = dict(zip(shared, itertools.accumulate(sizes, initial=0)))
        out_region = regions.region("out", max(1, sum(sizes))) if shared else None
        requested = []
        for name in outputs:
            output = self._module.InferRequestedOutput(name)
            if name in out_offsets:
                output.set_shared_memory(out_region.name, sizes[shared.index(name)], offset=out_offsets[name])
            requested.append(output)
        try:
            result = self._call(model, tensors, requested)
        except KilnError as exc:
            if "shared memory" not in str(exc).lower():
                raise
            log.info("Triton at %s does not know our shared memory (restarted?): registering it again", self.url)
            regions.register_again()  # Triton restarted and forgot our regions: once more, registered anew
            result = self._call(model, tensors, requested)
        import tritonclient.utils.shared_memory as shm

        values = {}
        for name in outputs:
            if name in out_offsets:
                shape = list(result.get_output(name).shape)
                values[name] = np.array(shm.get_contents_as_numpy(out_region.handle, np.float32, shape,
                                                                  offset=out_offsets[name]))
            else:
                values[name] = result.as_numpy(name)
        return values

    def _call(self, model: str, tensors: list, requested: list):
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                return self.connection().infer(model, tensors, outputs=requested, client_timeout=self.timeout_s)
            return self.connection().infer(model, tensors, outputs=requested)
        except InferenceServerException as exc:
            raise self._error(model, exc) from None
        except (ConnectionError, OSError) as exc:
            raise Unreachable(f"cannot reach Triton at {self.url} ({exc}); is `kiln serve` running?") from None

    def close(self) -> None:
        """Unregister and remove this client's shared-memory regions (they are also removed at exit)."""
        self._registry.close()
        self._local = threading.local()

    def _error(self, model: str, exc) -> KilnError:
        message = (exc.message() if callable(getattr(exc, "message", None)) else "") or str(exc)
        status = str(exc.status())
        if is_unreachable(message):
            return Unreachable(f"cannot reach Triton at {self.url}; is `kiln serve` running? ({message})")
        if "INVALID_ARG" in status or status == "400":  # the model's verdict on the input
            return InputError(f"{model}: {message}")
        if "UNAVAILABLE" in status or "NOT_FOUND" in status:  # Triton down, restarting, or the model unloaded
            return ServerError(f"Triton cannot run {model} now ({self.url}): {message}; is `kiln serve` running?")
        return KilnError(f"{model}: {message}")

    # -- state -------------------------------------------------------------------------------------
    def is_server_ready(self, timeout_s: float = 2.0) -> bool:
        return self._probe("is_server_ready", timeout_s)

    def is_server_live(self, timeout_s: float = 2.0) -> bool:
        return self._probe("is_server_live", timeout_s)

    def is_model_ready(self, model: str, timeout_s: float = 2.0) -> bool:
        return self._probe("is_model_ready", timeout_s, model)

    def _probe(self, check: str, timeout_s: float, *args: str) -> bool:
        """One of the client's yes/no checks; unreachable, refused, timed out or an unknown model all mean no."""
        try:
            if self.protocol == "grpc":
                return bool(getattr(self.connection(), check)(*args, client_timeout=timeout_s))
            return bool(getattr(self.connection(), check)(*args))
        except Exception:  # noqa: BLE001 - every failure is a "no"
            return False

    def model_config(self, model: str) -> dict:
        """The model's config as Triton reports it (JSON form of inference.ModelConfig)."""
        return self._reconnecting(self._model_config, model)

    def _model_config(self, model: str) -> dict:
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                return self.connection().get_model_config(model, as_json=True, client_timeout=self.timeout_s)["config"]
            return self.connection().get_model_config(model)
        except InferenceServerException as exc:
            raise self._error(model, exc) from None

    def ready_models(self, prefix: str = "") -> list[str]:
        """The names of the models Triton serves and has ready, those starting with `prefix`."""
        return self._reconnecting(self._ready_models, prefix)

    def _ready_models(self, prefix: str) -> list[str]:
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                index = self.connection().get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
                entries = index.get("models", [])
            else:
                entries = self.connection().get_model_repository_index()
        except InferenceServerException as exc:
            raise self._error("the repository index", exc) from None
        return sorted(e["name"] for e in entries if e.get("state") == "READY" and e["name"].startswith(prefix))

    def load_model(self, model: str, config: dict | None = None) -> None:
        """Load (or reload) a model: Triton's explicit model control (`kiln serve --max-checkpoints`). `config`: a
        whole model config in model_config's JSON form, which replaces the repository's for this load."""
        import json

        self._control("load_model", model, **({"config": json.dumps(config)} if config is not None else {}))

    def unload_model(self, model: str) -> None:
        self._control("unload_model", model)

    def _control(self, action: str, model: str, **options) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                getattr(self.connection(), action)(model, client_timeout=self.timeout_s, **options)
            else:
                getattr(self.connection(), action)(model, **options)
        except InferenceServerException as exc:
            raise ServerError(f"Triton could not {action.split('_')[0]} {model}: "
                              f"{(exc.message() if callable(getattr(exc, 'message', None)) else '') or exc}") from None

    def model_parameters(self, model: str) -> tuple[dict[str, str], int]:
        """A model's string parameters and its max_batch_size."""
        config = self.model_config(model)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}  # "" is left out
        return params, int(config.get("max_batch_size", 0))
