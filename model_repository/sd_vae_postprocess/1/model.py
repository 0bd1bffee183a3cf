"""sd_vae_postprocess: decoder output in [-1, 1] (N, 3, H, W) -> uint8 images (N, H, W, 3), as diffusers rounds them."""

import os
import site
import sys

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see kiln/triton_install.py
    if _path:
        site.addsitedir(_path)
_own = set(site.getsitepackages() + [site.getusersitepackages()])  # the stub interpreter's: after the above
sys.path.sort(key=lambda _p: _p in _own)

import triton_python_backend_utils as pb_utils

from kiln.imaging import to_uint8


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "decoded").as_numpy()
            pixels = to_uint8(image)  # diffusers: (x / 2 + 0.5).clamp(0, 1), channels last, (x * 255).round()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", pixels)]))
        return responses
