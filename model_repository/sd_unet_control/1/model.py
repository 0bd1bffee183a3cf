"""sd_unet_control: a Stable Diffusion component on ONNX Runtime or OpenVINO inside Triton's Python backend (see build/runtime_model.py)."""

import os
import site

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see orchestrator/triton_server.py
    if _path:
        site.addsitedir(_path)

from build.runtime_model import RuntimeModel as TritonPythonModel  # noqa: E402, F401
