# Production image: NVIDIA's Triton (24.10 = Triton 2.51, the version embedded here) serving a model
# repository built with native backends. Build the repository first, on the host:
#
#   .venv/bin/kiln build vit --weights PATH --backend openvino --precision int8 --triton-backend native --device cpu
#   docker build -t kiln-triton .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 kiln-triton      (add --gpus all for KIND_GPU)
#
# `vit` then runs on Triton's native onnxruntime/openvino backend; vit_preprocess and vit_postprocess
# stay Python-backend models and need numpy + Pillow and this project's torch-free core, `kiln`.
ARG TRITON_RELEASE=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3

COPY requirements-serving.txt /opt/kiln/requirements-serving.txt
RUN pip install --no-cache-dir -r /opt/kiln/requirements-serving.txt

# The torch-free core the Python-backend models import (no torch in the serving image).
COPY kiln/ /opt/kiln/kiln/
# The models' model.py files put this folder on sys.path (the stub ignores PYTHONPATH).
ENV KILN_SITE_PACKAGES=/opt/kiln

COPY model_repository/ /models/

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD curl -fsS localhost:8000/v2/models/vit_classify/ready || exit 1
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true"]
