"""The one Triton client core: KServe v2 over gRPC or HTTP (tritonclient), numpy in and out, errors as ours.

Every call to Triton in this project goes through `TritonClient`: the SD components of the
orchestrator, the ViT client, the API's ViT routes and health checks. A Triton error becomes a
KilnError naming the model: INVALID_ARG (the model's verdict on the request) an InputError;
Triton away, restarting or without the model a ServerError; anything else a KilnError.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from kiln.errors import InputError, KilnError, ServerError

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


class TritonClient:
    """A thread-safe client (one tritonclient connection per thread) for one Triton endpoint."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", *, timeout_s: float = 600.0) -> None:
        if protocol not in DEFAULT_URLS:
            raise KilnError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        self._local = threading.local()
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
                client = self._module.InferenceServerClient(self.url)
            else:
                client = self._module.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                            network_timeout=self.timeout_s)
            self._local.client = client
        return client

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run `model` on named arrays (dtype from numpy; bytes as object arrays) and return the named outputs."""
        from tritonclient.utils import InferenceServerException

        tensors = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array) if array.dtype != object else array
            tensor = self._module.InferInput(name, list(array.shape), wire_dtype(array))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [self._module.InferRequestedOutput(name) for name in outputs]
        try:
            if self.protocol == "grpc":
                result = self.connection().infer(model, tensors, outputs=requested, client_timeout=self.timeout_s)
            else:
                result = self.connection().infer(model, tensors, outputs=requested)
        except InferenceServerException as exc:
            raise self._error(model, exc) from None
        except (ConnectionError, OSError) as exc:
            raise ServerError(f"cannot reach Triton at {self.url} ({exc}); is `kiln serve` running?") from None
        return {name: result.as_numpy(name) for name in outputs}

    def _error(self, model: str, exc) -> KilnError:
        message = (exc.message() if callable(getattr(exc, "message", None)) else "") or str(exc)
        status = str(exc.status())
        lowered = message.lower()
        if "failed to connect" in lowered or "connection refused" in lowered or "connect failed" in lowered:
            return ServerError(f"cannot reach Triton at {self.url}; is `kiln serve` running? ({message})")
        if "INVALID_ARG" in status or status == "400":  # the model's verdict on the input
            return InputError(f"{model}: {message}")
        if "UNAVAILABLE" in status or "NOT_FOUND" in status:  # Triton down, restarting, or the model unloaded
            return ServerError(f"Triton cannot run {model} now ({self.url}): {message}; is `kiln serve` running?")
        return KilnError(f"{model}: {message}")

    # -- state -------------------------------------------------------------------------------------
    def is_server_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            if self.protocol == "grpc":
                return bool(self.connection().is_server_ready(client_timeout=timeout_s))
            return bool(self.connection().is_server_ready())
        except Exception:  # noqa: BLE001 - unreachable, refused, timed out: all mean "not ready"
            return False

    def is_model_ready(self, model: str, timeout_s: float = 2.0) -> bool:
        try:
            if self.protocol == "grpc":
                return bool(self.connection().is_model_ready(model, client_timeout=timeout_s))
            return bool(self.connection().is_model_ready(model))
        except Exception:  # noqa: BLE001 - unreachable or unknown model: not ready
            return False

    def model_config(self, model: str) -> dict:
        """The model's config as Triton reports it (JSON form of inference.ModelConfig)."""
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                return self.connection().get_model_config(model, as_json=True, client_timeout=self.timeout_s)["config"]
            return self.connection().get_model_config(model)
        except InferenceServerException as exc:
            raise self._error(model, exc) from None

    def model_parameters(self, model: str) -> tuple[dict[str, str], int]:
        """A model's string parameters and its max_batch_size."""
        config = self.model_config(model)
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        return params, int(config.get("max_batch_size", 0))
