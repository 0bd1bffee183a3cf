"""vit_preprocess: encoded image bytes -> the ViT's float32 input, timm's eval transform (Triton Python backend).

One response per request; a bad image fails its own request with a message, never the batch.
"""

import os
import site
import sys

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see kiln/triton_server.py
    if _path:
        site.addsitedir(_path)
_own = set(site.getsitepackages() + [site.getusersitepackages()])  # the stub interpreter's: after the above
sys.path.sort(key=lambda _p: _p in _own)

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.errors import InputError
from kiln.imaging import EvalTransform, ImageLimits, preprocess
from kiln.runtime import model_config
from kiln.runtime.model import error_response


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config(args)
        self.transform = EvalTransform.from_json(params["transform"])
        self.limits = ImageLimits(max_pixels=int(params["max_pixels"]), min_side=int(params["min_side"]))
        self.default_layer = int(params["default_layer"])

    def execute(self, requests):
        # A bad image is the request's fault: INVALID_ARG makes it gRPC INVALID_ARGUMENT / HTTP 400, not a server error.
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
            try:
                if images.size == 0:
                    raise InputError("the request carried no image")
                pixels = np.stack([preprocess(bytes(item), self.transform, self.limits) for item in images])
            except InputError as exc:
                responses.append(error_response(f"vit_preprocess: {exc}"))
                continue
            except Exception as exc:  # noqa: BLE001 - whatever PIL raises fails this request only
                responses.append(error_response(f"vit_preprocess: cannot process image ({type(exc).__name__})"))
                continue
            layer = np.full((len(pixels), 1), self.default_layer, dtype=np.int64)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("pixel_values", pixels), pb_utils.Tensor("layer", layer)]))
        return responses
