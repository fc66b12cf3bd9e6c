# One image for every synthderm service: the API (uvicorn), the one-shot migration
# (`synthderm db upgrade`) and the Celery workers (gpu and train queues). The API never
# imports torch, so carrying the worker extras costs it only disk space.
#
# Base image: the CUDA *base* flavour (driver-facing env vars, NVIDIA_REQUIRE_CUDA, forward
# compatibility) rather than runtime/cudnn-runtime: the pinned torch==2.13.0 wheels bring
# their own CUDA 13.0 runtime, cuBLAS and cuDNN as pip packages, so a runtime image would
# only duplicate several GiB of libraries. Keep the CUDA major here in step with torch's.
# Python is the distribution's python3 (3.12 on Ubuntu 24.04; pyproject needs >= 3.11).

ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------
# builder: a virtual environment with the project and its worker extras
# ---------------------------------------------------------------------------------------
FROM ${CUDA_BASE_IMAGE} AS builder

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3008 (pin apt versions): not pinned on purpose. The Ubuntu archive keeps only the newest
# build of a package in -updates/-security, so exact pins break the build at the next
# security upgrade; the base image tag fixes the release and the Python minor version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        python3 \
        python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /build

# Dependencies first, read from pyproject.toml alone, so that editing the sources does not
# reinstall torch and the CUDA wheels (several GiB).
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["worker"]))' \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# Then the project itself (the `synthderm` console script), and a consistency check.
COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && pip check

# ---------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------
FROM ${CUDA_BASE_IMAGE} AS runtime

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3008: see the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        python3 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 synthderm \
    && useradd --system --uid 10001 --gid synthderm --create-home \
        --home-dir /home/synthderm --shell /usr/sbin/nologin synthderm

COPY --from=builder /opt/venv /opt/venv

# PYTHONPATH: the sources in WORKDIR shadow the installed copy, so alembic.ini,
# migrations/ and any path computed from a module's __file__ resolve under /srv/synthderm.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/srv/synthderm \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/synthderm/.cache/huggingface \
    SYNTHDERM_MODELS_DIR=/models

WORKDIR /srv/synthderm

# Sources stay root-owned (read-only to the service user); only var/ (the embedded
# default's data folder, unused by the compose stack) is writable.
COPY . .
RUN mkdir -p /srv/synthderm/var /models \
    && chown synthderm:synthderm /srv/synthderm/var

USER 10001:10001

EXPOSE 8000

# The compose file overrides the command for migrate and the workers, and defines the
# per-service healthchecks (an image-level HTTP check would mark the workers unhealthy).
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
