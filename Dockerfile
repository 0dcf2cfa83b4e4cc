# syntax=docker/dockerfile:1
# largemodel images, one Dockerfile, two targets (no compilers or build tools in either):
#   docker build --target operator -t largemodel-operator:0.1.0 .  # the kopf operator: no torch, ~160 MB
#   docker build --target runtime  -t largemodel-runtime:0.1.0 .   # rank pods: CUDA PyTorch + runtime extra
# Base images are pinned by tag and by the digest of their multi-arch index.
# Both are build args whose defaults are those pins (an air-gapped build passes a mirrored copy,
# tests/packaging/test_image_build.py a local Debian bookworm + Python 3.11 stand-in).
# checkov:skip=CKV_DOCKER_7:FROM names build args whose defaults are pinned by tag and digest (below), or a stage
ARG PYTHON_BASE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1
ARG CUDA_TORCH_BASE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime@sha256:417bd75df6365104c283ea4c1651fb3530d9eb5a4c2fafa51943cff2a94e6385
# The runtime's PyTorch: TORCH=cuda (default) keeps the CUDA base's own torch; TORCH=cpu builds the
# runtime on PYTHON_BASE with torch 2.13.0+cpu from TORCH_CPU_INDEX, a PEP 503 index like PyTorch's own
# (CPU nodes, CI; about a tenth of the CUDA image):
#   docker build --target runtime --build-arg TORCH=cpu -t largemodel-runtime:0.1.0-cpu .
ARG TORCH=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# ---- wheel: builds the pure-Python wheel (gRPC stubs generated here); never shipped ----
FROM ${PYTHON_BASE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install setuptools==84.2.1 wheel==0.48.0
COPY pyproject.toml README.md ./
COPY src/ src/
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .
# The CPU decode kernels (runtime/cpu_kernels.cpp), prebuilt for every instruction-set level this
# architecture may meet (amd64: avx512, avx2, generic; arm64: neon, generic) so rank pods never need a
# compiler: built against the CPU build of the runtime base's torch release (the same C++ API; the
# libraries are keyed by the release, not the build variant), then copied into the runtime stage.
# PREBUILT_KERNELS=0 skips them (a build without that torch index): pods then build them on first use
# where a compiler exists, and use torch's ops where none does.
ARG PREBUILT_KERNELS=1
ARG TORCH
ARG TORCH_CPU_INDEX
RUN mkdir /kernels \
 && if [ "${PREBUILT_KERNELS}" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
      && rm -rf /var/lib/apt/lists/* \
      && pip install --index-url "${TORCH_CPU_INDEX}" "torch==$(if [ "${TORCH}" = cpu ]; then echo 2.13.0; else echo 2.8.0; fi)" \
      && pip install --no-deps /wheels/largemodel-*.whl \
      && LARGEMODEL_KERNEL_DIR=/kernels PYTHONSAFEPATH=1 python -m largemodel.runtime.cpu_kernels --all; \
    fi

# ---- operator: only the operator's dependencies (kopf, pydantic, PyYAML, prometheus-client) ----
FROM ${PYTHON_BASE} AS operator
ARG LARGEMODEL_VERSION=0.1.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "largemodel @ file:///wheels/largemodel-${LARGEMODEL_VERSION}-py3-none-any.whl" \
 && useradd --uid 10001 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin largemodel
USER 10001:10001
# /healthz and /metrics share the operator's --metrics-port (default 8080, as the chart sets it).
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["largemodel"]
CMD ["operator", "--all-namespaces"]

# ---- torch-cuda / torch-cpu: the runtime's PyTorch, picked by TORCH (only the picked one is built) ----
FROM ${CUDA_TORCH_BASE} AS torch-cuda

FROM ${PYTHON_BASE} AS torch-cpu
ARG TORCH_CPU_INDEX
RUN pip install --no-cache-dir --disable-pip-version-check --index-url "${TORCH_CPU_INDEX}" torch==2.13.0+cpu

# ---- runtime: one pod per pipeline stage, one process per GPU (`largemodel rank`) ----
# (torch-${TORCH} names a stage above, not an image: DL3006 does not apply)
# hadolint ignore=DL3006
FROM torch-${TORCH} AS runtime
ARG LARGEMODEL_VERSION=0.1.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    METRICS_PORT=9100 \
    LARGEMODEL_KERNEL_DIR=/opt/largemodel/kernels
# The base's torch (CUDA 2.8.0, or 2.13.0+cpu) satisfies the runtime extra (torch>=2.4,<2.15); naming
# its release keeps pip from ever swapping it for another build while resolving the rest. DeepSpeed (spec.engine:
# deepspeed) installs from its sdist against that torch with no ops prebuilt: AutoTP inference
# needs none, so no compiler either.
# runtime/grpc_server.py compiles largemodel.proto with grpc_tools on first use, into the temp dir
# (the pod's /tmp emptyDir, since the root filesystem is read-only): the image ships grpcio-tools
# (a Python wheel with its own protoc, no compiler) at the version the dev extra tests with.
# (the torch pin is the base's own release, read at build time: DL3013 cannot see it)
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    torch="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')" \
 && DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8 "${torch}" \
 && pip install "largemodel[runtime,deepspeed] @ file:///wheels/largemodel-${LARGEMODEL_VERSION}-py3-none-any.whl" \
      grpcio-tools==1.85.1 "${torch}" \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin largemodel)
# The prebuilt decode kernels (see the wheel stage), read-only: load() picks the CPU's best level.
RUN --mount=type=bind,from=wheel,source=/kernels,target=/mnt/kernels \
    mkdir -p /opt/largemodel && cp -r /mnt/kernels /opt/largemodel/kernels
# The operator's rank pods run as 1000 with /tmp and /dev/shm as their only writable paths.
USER 1000:1000
EXPOSE 8000 9000 9100 29500
# Every rank pod's local rank 0 answers /healthz on the metrics port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METRICS_PORT', '9100'), timeout=4)"]
ENTRYPOINT ["largemodel"]
CMD ["rank"]
