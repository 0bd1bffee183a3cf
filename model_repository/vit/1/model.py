"""vit: ViT-B/16 on ONNX Runtime or OpenVINO inside Triton's Python backend (the embedded default).

The runtime and artifact are chosen at build time (config parameters); batching, per-request
errors and output selection are kiln.runtime.model.RuntimeModel's. This model adds the optional
`layer` input: left out, it is the last block; -1 counts from the end. The image comes as exactly one of
`pixel_values` (FP32, the eval transform's output) and `pixels` (UINT8, resized and cropped, not yet scaled: a
quarter of the bytes, scaled by the session as the config's `byte_inputs` says; on a GPU, after the copy).
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

from kiln.runtime.model import RuntimeModel


class TritonPythonModel(RuntimeModel):
    def initialize(self, args):
        super().initialize(args)
        self.default_layer = int(self.params["default_layer"])
        self.num_layers = self.default_layer + 1

    def prepare(self, inputs):
        given = [name for name in ("pixel_values", "pixels") if name in inputs]
        if len(given) != 1:
            return (f"send the image as exactly one of pixel_values (FP32, normalised) and pixels (UINT8, resized and "
                    f"cropped), not {' and '.join(given) or 'neither'}")
        if "pixels" in inputs:  # uint8: the session scales it (kiln.runtime.ByteScale)
            inputs["pixel_values"] = inputs.pop("pixels")
        pixels = inputs["pixel_values"]
        if "layer" not in inputs:
            inputs["layer"] = np.full((len(pixels), 1), self.default_layer, dtype=np.int64)
        else:
            layer = inputs["layer"].astype(np.int64).reshape(len(pixels), 1)
            layer = np.where(layer < 0, layer + self.num_layers, layer)  # -1 = last block
            if layer.min() < 0 or layer.max() >= self.num_layers:
                return (f"layer must be in [-{self.num_layers}, {self.num_layers - 1}], "
                        f"got {inputs['layer'].reshape(-1).tolist()}")
            inputs["layer"] = layer
        return super().prepare(inputs)
