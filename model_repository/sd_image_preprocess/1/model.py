"""sd_image_preprocess: init image bytes + (height, width) -> the VAE encoder's input in [-1, 1].

build.imaging.vae_input: decoded as the ViT's images are (any format and mode, EXIF, transparency
over white), resized with Lanczos ("just resize"), mapped to [-1, 1]. A bad image fails its own
request only.
"""

import os
import site

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see orchestrator/triton_server.py
    if _path:
        site.addsitedir(_path)


import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from build.runtime import model_config  # noqa: E402
from build.errors import InputError  # noqa: E402
from build.imaging import vae_input  # noqa: E402


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
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"sd_image_preprocess: {exc}", pb_utils.TritonError.INVALID_ARG)))
                continue
            except Exception as exc:  # noqa: BLE001 - whatever PIL raises fails this request only
                message = f"sd_image_preprocess: cannot process image ({type(exc).__name__})"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("pixels", pixels)]))
        return responses

    def _one(self, data: bytes, height: int, width: int) -> np.ndarray:
        if not (self.min_size <= height <= self.max_size and self.min_size <= width <= self.max_size):
            raise InputError(f"size {width}x{height} is outside the built profile [{self.min_size}, {self.max_size}]")
        return vae_input(data, width, height)
