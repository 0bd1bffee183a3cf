"""vit: ViT-B/16 on ONNX Runtime or OpenVINO inside Triton's Python backend (the embedded default).

The runtime and artifact are chosen at build time (config parameters). Requests of one execute()
call run as one batch; if the batch fails, each request is retried alone so that only the bad
one gets an error. Outputs are computed only when some request asks for them.
"""

import os
import site

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see orchestrator/triton_server.py
    if _path:
        site.addsitedir(_path)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from build.runtime import Session, SessionOptions  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.session = Session(SessionOptions(
            runtime=params["runtime"],
            path=version_dir / params["artifact"],
            inference_precision=params.get("inference_precision", "f32"),
            threads=int(params.get("threads", "0")),
        ))
        self.default_layer = int(params["default_layer"])
        self.num_layers = self.default_layer + 1
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        feeds = [self._inputs(r) for r in requests]
        wanted = [list(r.requested_output_names()) or self.output_names for r in requests]
        valid = [i for i, f in enumerate(feeds) if not isinstance(f, str)]
        results = [None] * len(requests)
        if valid:
            names = [n for n in self.output_names if any(n in wanted[i] for i in valid)]
            try:
                merged = {k: np.concatenate([feeds[i][k] for i in valid]) for k in feeds[valid[0]]}
                outputs = self.session.run(merged, names)
                start = 0
                for i in valid:
                    count = len(feeds[i]["pixel_values"])
                    results[i] = {n: outputs[n][start:start + count] for n in wanted[i]}
                    start += count
            except Exception:  # a batch-level failure: retry alone so only the culprit fails
                for i in valid:
                    try:
                        results[i] = self.session.run(feeds[i], wanted[i])
                    except Exception as exc:  # noqa: BLE001 - reported on that request
                        results[i] = f"vit: inference failed: {exc}"
        responses = []
        for i in range(len(requests)):
            outcome = feeds[i] if isinstance(feeds[i], str) else results[i]
            if isinstance(outcome, str):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(outcome)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in outcome.items()]))
        return responses

    def _inputs(self, request):
        """The request's inputs as a feed, or an error message."""
        pixels = pb_utils.get_input_tensor_by_name(request, "pixel_values").as_numpy()
        layer_tensor = pb_utils.get_input_tensor_by_name(request, "layer")
        if layer_tensor is None:
            layer = np.full((len(pixels), 1), self.default_layer, dtype=np.int64)
        else:
            layer = layer_tensor.as_numpy().astype(np.int64).reshape(len(pixels), 1)
            layer = np.where(layer < 0, layer + self.num_layers, layer)  # -1 = last block
            if layer.min() < 0 or layer.max() >= self.num_layers:
                return f"vit: layer must be in [-{self.num_layers}, {self.num_layers - 1}], got {layer.reshape(-1).tolist()}"
        if not np.isfinite(pixels).all():
            return "vit: pixel_values contains NaN or infinity"
        return {"pixel_values": pixels, "layer": layer}
