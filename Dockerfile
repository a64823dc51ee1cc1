# stepserve images. Two variants from one file:
#   docker build --target cpu  -t stepserve:cpu  .   # slim, CPU torch (the built-in model)
#   docker build --target cuda -t stepserve:cuda .   # CUDA runtime, CUDA torch, onnxruntime-gpu
# Both run as a non-root user; the entrypoint is the `stepserve` CLI
# (serve / api / worker / build ...).

# ---- CPU: build a virtualenv, then copy it into a slim runtime ---------------------------
FROM python:3.11-slim AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# the CPU wheel of torch (PyPI's default Linux wheel pulls the CUDA libraries)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
# the package sources (.dockerignore keeps out venvs, runs, tests, docs)
COPY . /src
RUN pip install "/src[onnx,redis,families]"

FROM python:3.11-slim AS cpu
RUN useradd --create-home --uid 10001 stepserve
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE \
    STEPSERVE_HOST=0.0.0.0 STEPSERVE_BUILD_DIR=/home/stepserve/builds
USER stepserve
WORKDIR /home/stepserve
EXPOSE 8000 9100
ENTRYPOINT ["stepserve"]
CMD ["serve"]

# ---- CUDA: the same on NVIDIA's runtime image ----------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS cuda-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
# the package sources (.dockerignore keeps out venvs, runs, tests, docs)
COPY . /src
RUN pip install "/src[redis,families]" onnx onnxscript onnxruntime-gpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS cuda
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
