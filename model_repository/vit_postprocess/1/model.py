"""vit_postprocess: logits -> top-k labels (the build's labels.json) and softmax probabilities (Python backend)."""

import os
import site
import sys

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see kiln/triton_install.py
    if _path:
        site.addsitedir(_path)
_own = set(site.getsitepackages() + [site.getusersitepackages()])  # the stub interpreter's: after the above
sys.path.sort(key=lambda _p: _p in _own)

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.runtime import model_config
from kiln.runtime.model import error_response


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config(args)
        self.default_k = int(params["default_top_k"])
        self.max_k = int(params["max_top_k"])
        labels_path = Path(args["model_repository"]) / args["model_version"] / "labels.json"
        self.labels = np.array([s.encode() for s in json.loads(labels_path.read_text())], dtype=object)

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float64)
            k_tensor = pb_utils.get_input_tensor_by_name(request, "top_k")
            k = int(k_tensor.as_numpy().reshape(-1)[0]) if k_tensor is not None else self.default_k
            if not 1 <= k <= self.max_k:
                responses.append(error_response(f"vit_postprocess: top_k must be between 1 and {self.max_k}, got {k}"))
                continue
            k = min(k, logits.shape[-1])  # "the best k": a model with fewer classes answers with all of them
            shifted = logits - logits.max(axis=-1, keepdims=True)
            probs = np.exp(shifted)
            probs /= probs.sum(axis=-1, keepdims=True)
            # Stable descending order; argpartition first keeps it cheap for small k.
            part = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
            ranks = np.argsort(-np.take_along_axis(probs, part, -1), axis=-1, kind="stable")
            order = np.take_along_axis(part, ranks, -1)
            scores = np.take_along_axis(probs, order, -1).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("labels", self.labels[order]),
                pb_utils.Tensor("scores", scores),
                pb_utils.Tensor("indices", order.astype(np.int32)),
            ]))
        return responses
