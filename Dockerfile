# Production image: NVIDIA's Triton (24.10 = Triton 2.51, the version embedded here) serving a model repository
# built for its native backends. Build the repository first, on the host, into a folder of its own:
#
#   .venv/bin/kiln build vit --weights PATH --triton-backend native --repo repos/native
#   .venv/bin/kiln build sd --weights PATH --triton-backend native --repo repos/native      (add --device gpu)
#   docker build --build-arg REPO=repos/native -t kiln-triton .
#   docker run --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 kiln-triton     (add --gpus all)
#
# The text encoder, UNet, VAE, ControlNets and ViT run on Triton's native onnxruntime or openvino backend; the
# tokenizer and the pre/post-processing models stay Python-backend models and need numpy, Pillow, tokenizers and
# this project's torch-free core, `kiln`. The Python backend passes tensors through /dev/shm: Docker's 64 MB default
# is too small, hence --shm-size.
#
# The torch variants (torch-*, torch-aoti-*) run inside Python-backend models and need torch in the image: build FROM
# NVIDIA's PyTorch flavour (--build-arg TRITON_FLAVOR=pyt-python-py3), and build the repository with that image's
# torch (torch.export's format changes between releases; the check below refuses a program from another one). Pick
# the TRITON_RELEASE whose torch is the one the repository was built with (`docker run --rm IMAGE python3 -c
# "import torch; print(torch.__version__)"`): 24.10's is older than the torch.export features kiln's build uses.
ARG TRITON_RELEASE=24.10
ARG TRITON_FLAVOR=py3

# The orchestrator image (docker build --target orchestrator -t kiln-orchestrator .): the serving install
# (requirements-serve.txt: CPU torch for the schedulers, no CUDA, no build tooling) and `kiln serve --triton-url`,
# the API in front of Tritons elsewhere (deploy/ runs it on Kubernetes). Its models all run in Triton. Off loopback
# the API needs credentials: KILN_API_KEYS (and KILN_METRICS_TOKEN for Prometheus) in the environment.
FROM python:3.11-slim AS orchestrator
WORKDIR /opt/kiln
COPY requirements-serve.txt pyproject.toml setup.cfg README.md /opt/kiln/
COPY kiln/ /opt/kiln/kiln/
COPY orchestrator/ /opt/kiln/orchestrator/
COPY build/ /opt/kiln/build/
COPY clients/ /opt/kiln/clients/
COPY benchmarks/ /opt/kiln/benchmarks/
RUN pip install --no-cache-dir --no-deps --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements-serve.txt && \
    pip install --no-cache-dir --no-deps . && rm -rf /opt/kiln/.kiln
USER nobody
WORKDIR /tmp
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c \
  "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health/live', timeout=4)"
ENTRYPOINT ["kiln"]
CMD ["serve", "--triton-url", "triton:8001", "--shared-memory", "off", "--listen", "0.0.0.0"]

# The default target: Triton with the repository.
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-${TRITON_FLAVOR}

# A repository built by `kiln build ... --triton-backend native` (a folder inside the build context).
ARG REPO
RUN test -n "${REPO}" || { echo "kiln: pass --build-arg REPO=<a repository built with --triton-backend native>" >&2; \
    exit 1; }

COPY requirements-serving.txt /opt/kiln/requirements-serving.txt
RUN pip install --no-cache-dir -r /opt/kiln/requirements-serving.txt

# The torch-free core the Python-backend models import (no torch in the serving image, but for torch variants).
COPY kiln/ /opt/kiln/kiln/
# The models' model.py files put this folder on sys.path (the stub ignores PYTHONPATH).
ENV KILN_SITE_PACKAGES=/opt/kiln

COPY ${REPO}/ /models/
# Refuse, at build time, what would stop tritonserver at start: a folder without config, a Python-backend runtime
# the image lacks, a torch program from another torch release.
RUN PYTHONPATH=/opt/kiln python3 -m kiln.repository /models

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD curl -fsS localhost:8000/v2/health/ready || exit 1
# A GPU's CUDA memory pool of 256 MB, as kiln's own Triton has: the Python backend hands a client's CUDA shared memory
# to a torch model's stub through it (kiln.triton_server.TritonOptions.cuda_memory_pool_mb).
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true", \
     "--cuda-memory-pool-byte-size=0:268435456"]
