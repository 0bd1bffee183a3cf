"""vit_preprocess: encoded image bytes -> the ViT's input, timm's eval transform (Triton Python backend).

Its output is `pixel_values` (float32, scaled), or, where its config's `scaled` is "false", `pixels`: the uint8 image
resized and cropped, which the `vit` model scales (a quarter of the bytes through Triton and onto a GPU).

The images of one execute() call (every request Triton's batcher gathered) are decoded and transformed side by side on a
pool of `threads` threads (0: every core it may use; PIL's threads do not spin): PIL decodes and resizes without the
GIL, and on a GPU server this model, not the ViT, sets the JPEG path's images/s. One response per request; a bad image
fails its own request with a message, never the batch. With `decode` "torch" (kiln build vit --decode torch) the batch's
JPEGs are decoded together by torchvision on the instance's device (nvJPEG on a GPU) and resized there
(kiln.runtime.torch_decode), and the uint8 pixels stay there, handed to `vit` through DLPack.
"""

import os
import site
import sys
from concurrent.futures import ThreadPoolExecutor

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see kiln/triton_install.py
    if _path:
        site.addsitedir(_path)
_own = set(site.getsitepackages() + [site.getusersitepackages()])  # the stub interpreter's: after the above
sys.path.sort(key=lambda _p: _p in _own)

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.imaging import EvalTransform, ImageLimits, preprocess_or_message
from kiln.machine import cores
from kiln.runtime import model_config
from kiln.runtime.model import error_response


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config(args)
        self.transform = EvalTransform.from_json(params["transform"])
        self.limits = ImageLimits(max_pixels=int(params["max_pixels"]), min_side=int(params["min_side"]))
        self.default_layer = int(params["default_layer"])
        self.jpeg_draft = params.get("jpeg_draft", "false") == "true"  # kiln build vit --jpeg-draft
        self.scaled = params.get("scaled", "true") == "true"
        self.output = "pixel_values" if self.scaled else "pixels"
        threads = int(params.get("threads", "0")) or cores()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="vit_preprocess") if threads > 1 else None
        self.decoder = None
        if params.get("decode", "pil") == "torch":
            try:
                from kiln.runtime.torch_decode import TorchDecoder
            except ImportError as exc:
                raise RuntimeError(f"vit_preprocess: decode \"torch\" needs torch and torchvision where Triton runs "
                                   f"({exc}): build with --decode pil") from None
            gpu = args.get("model_instance_kind") == "GPU"
            self.decoder = TorchDecoder(self.transform, self.limits,
                                        f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu")

    def _one(self, data: bytes):
        """One image's pixels, or the message that fails its request."""
        return preprocess_or_message(data, self.transform, self.limits, self.jpeg_draft, self.scaled)

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy().reshape(-1) for r in requests]
        payloads = [bytes(item) for batch in images for item in batch]
        if self.decoder is not None:
            outcomes = iter(self.decoder(payloads))
        else:
            outcomes = iter(list(self.pool.map(self._one, payloads)) if self.pool and len(payloads) > 1
                            else [self._one(data) for data in payloads])
        # A bad image is the request's fault: INVALID_ARG makes it gRPC INVALID_ARGUMENT / HTTP 400, not a server error.
        responses = []
        for batch in images:
            pixels = [next(outcomes) for _ in range(batch.size)]
            problems = [p for p in pixels if isinstance(p, str)] or ([] if pixels else ["the request carried no image"])
            if problems:
                responses.append(error_response(f"vit_preprocess: {problems[0]}"))
                continue
            layer = np.full((len(pixels), 1), self.default_layer, dtype=np.int64)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                self._pixels(pixels), pb_utils.Tensor("layer", layer)]))
        return responses

    def _pixels(self, pixels: list):
        if self.decoder is None:
            return pb_utils.Tensor(self.output, np.stack(pixels))
        batch = self.decoder.stack(pixels)  # where they were decoded: on a GPU, handed over there through DLPack
        if isinstance(batch, np.ndarray):
            return pb_utils.Tensor(self.output, batch)
        return pb_utils.Tensor.from_dlpack(self.output, batch)

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
