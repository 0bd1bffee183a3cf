"""sd_image_preprocess: init image bytes + (height, width) -> the VAE encoder's input in [-1, 1].

kiln.imaging.vae_input: decoded as the ViT's images are (any format and mode, EXIF, transparency
over white), resized with Lanczos ("just resize"), mapped to [-1, 1]. A bad image fails its own
request only.
"""

import os
import site
import sys

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see kiln/triton_install.py
    if _path:
        site.addsitedir(_path)
_own = set(site.getsitepackages() + [site.getusersitepackages()])  # the stub interpreter's: after the above
sys.path.sort(key=lambda _p: _p in _own)

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.errors import InputError
from kiln.imaging import vae_input
from kiln.runtime import model_config
from kiln.runtime.model import error_response


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config(args)
        self.min_size, self.max_size = int(params["min_size"]), int(params["max_size"])

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
            sizes = pb_utils.get_input_tensor_by_name(request, "size").as_numpy().reshape(-1, 2)
            try:
                pixels = np.stack([self._one(bytes(data), int(h), int(w)) for data, (h, w) in zip(images, sizes)])
            except InputError as exc:
                responses.append(error_response(f"sd_image_preprocess: {exc}"))
                continue
            except Exception as exc:  # noqa: BLE001 - whatever PIL raises fails this request only
                responses.append(error_response(f"sd_image_preprocess: cannot process image ({type(exc).__name__})"))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("pixels", pixels)]))
        return responses

    def _one(self, data: bytes, height: int, width: int) -> np.ndarray:
        if not (self.min_size <= height <= self.max_size and self.min_size <= width <= self.max_size):
            raise InputError(f"size {width}x{height} is outside the built profile [{self.min_size}, {self.max_size}]")
        return vae_input(data, width, height)
