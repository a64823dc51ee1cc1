# stepserve images. Two variants from one file:
#   docker build --target cpu  -t stepserve:cpu  .   # slim, CPU torch (the built-in model)
#   docker build --target cuda -t stepserve:cuda .   # CUDA runtime, CUDA torch, onnxruntime-gpu
# Both run as a non-root user; the entrypoint is the `stepserve` CLI
# (serve / api / worker / build ...).
#
# Build arguments (scripts/build-image.sh sets them for machines that reach only the
# package registries):
#   BASE / CUDA_BASE  the base images (any Debian-like image with python3 >= 3.10 and venv)
#   TORCH_INDEX       the index torch comes from ("" = the default registry; a torch wheel
#                     in deploy/image/wheels/ is preferred either way)
#   PIP_CERT          a CA bundle for pip inside the build, copied into deploy/image/certs/
#                     (used by the build stages only, never in the final image)
ARG BASE=python:3.11-slim
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- CPU: build a virtualenv, then copy it into a slim runtime ---------------------------
FROM ${BASE} AS cpu-build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_CERT=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=${PIP_CERT}
COPY deploy/image /image
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# the CPU wheel of torch (PyPI's default Linux wheel pulls the CUDA libraries)
RUN pip install --find-links /image/wheels ${TORCH_INDEX:+--index-url $TORCH_INDEX} \
    torch==2.13.0
# the package sources (.dockerignore keeps out venvs, runs, tests, docs)
COPY . /src
RUN pip install "/src[onnx,redis,families]" \
    && rm -rf /src /image \
    # what the server never runs: test suites shipped inside packages, caches
    && find /opt/venv -depth \( -name __pycache__ -o -name tests -o -name test \) \
       -path '*/site-packages/*' -type d -exec rm -rf {} + \
    && find /opt/venv -name '*.pyc' -delete

FROM ${BASE} AS cpu
RUN useradd --create-home --uid 10001 stepserve
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE \
    PYTHONDONTWRITEBYTECODE=1 \
    STEPSERVE_HOST=0.0.0.0 STEPSERVE_BUILD_DIR=/home/stepserve/builds
USER stepserve
WORKDIR /home/stepserve
EXPOSE 8000 9100
ENTRYPOINT ["stepserve"]
CMD ["serve"]

# ---- CUDA: the same on NVIDIA's runtime image ----------------------------------------------
FROM ${CUDA_BASE} AS cuda-build
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG PIP_CERT=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive \
    PIP_CERT=${PIP_CERT}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/image/certs /image/certs
RUN pip install ${CUDA_TORCH_INDEX:+--index-url $CUDA_TORCH_INDEX} torch==2.13.0
# the package sources (.dockerignore keeps out venvs, runs, tests, docs)
COPY . /src
RUN pip install "/src[redis,families]" onnx onnxscript onnxruntime-gpu && rm -rf /src

FROM ${CUDA_BASE} AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 10001 stepserve
COPY --from=cuda-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 STEPSERVE_HOST=0.0.0.0 \
    STEPSERVE_DEVICE=cuda STEPSERVE_BUILD_DIR=/home/stepserve/builds
USER stepserve
WORKDIR /home/stepserve
EXPOSE 8000 9100
ENTRYPOINT ["stepserve"]
CMD ["worker"]
