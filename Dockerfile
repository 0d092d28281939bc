# syntax=docker/dockerfile:1
#
# One image runs every stage of the pipeline on a GPU host, and serves the champion:
#   docker build -t transfer-pipeline:latest .
#   docker run --rm --gpus all -v "$PWD/data:/app/data" ... transfer-pipeline:latest pretrain
#   docker run --rm -p 5001:5001 -e MLFLOW_TRACKING_URI=... transfer-pipeline:latest serve
# (docs/deploy.md has the full commands.)
#
# Versions: CUDA 13.0 "base" image on Ubuntu 22.04 + CPython 3.11 + torch==2.14.1 /
# torchvision==0.29.1 from PyPI. Those Linux wheels are CUDA 13 builds that bring their own
# CUDA user-space libraries (cuBLAS, cuDNN 9, NCCL... as nvidia-* wheels), so the base image
# only needs the driver-facing part (cuda-compat, NVIDIA_* env for the container toolkit); a
# "runtime"/"cudnn-runtime" base would ship the same libraries twice (~3 GB more). Host needs
# an NVIDIA driver that supports CUDA 13 (>= 580) and the NVIDIA container toolkit.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.11
ARG APP_UID=1000

# Not pinned: apt packages follow the base image's Ubuntu release, and exact versions break
# the build whenever Ubuntu publishes a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git \
    && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv

# A uv-managed CPython 3.11 (python-build-standalone) under /opt, readable by the app user,
# in a venv that is first on PATH: `python`, `transfer`, `mlflow`, `prefect`, `dvc`.
ENV UV_PYTHON_INSTALL_DIR=/opt/uv-python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN uv venv --python "${PYTHON_VERSION}" /opt/venv

WORKDIR /app

# Dependencies first (pinned in pyproject.toml), so a code change does not reinstall torch.
# prefect-docker: the image also runs the Docker work-pool worker and `prefect deploy`'s
# build/push steps (prefect.yaml).
ARG PREFECT_DOCKER_VERSION=0.7.4
COPY pyproject.toml ./
RUN uv pip install -r pyproject.toml "prefect-docker==${PREFECT_DOCKER_VERSION}"

# The project: packages, flows, params, dvc.yaml, prefect.yaml (see .dockerignore).
COPY . .
RUN uv pip install --no-deps . \
    && groupadd --gid "${APP_UID}" app \
    && useradd --create-home --uid "${APP_UID}" --gid "${APP_UID}" --shell /usr/sbin/nologin app \
    && mkdir -p data mlruns artifacts models metrics \
    && chown -R app:app /app

USER ${APP_UID}:${APP_UID}

# Containers bind the scoring server to all interfaces (serve.host defaults to loopback);
# MLflow tracking defaults to sqlite under /app/mlruns: mount a volume or set
# MLFLOW_TRACKING_URI to a tracking server. Matplotlib/torch caches live in the user's home.
ENV TRANSFER_SERVE_HOST=0.0.0.0 \
    TRANSFER_SERVE_PORT=5001 \
    MPLBACKEND=Agg \
    HOME=/home/app

EXPOSE 5001
VOLUME ["/app/data", "/app/mlruns"]

# Healthy when the scoring server answers /ping; containers running a batch stage
# (pretrain, finetune...) serve nothing and always report healthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; argv = open('/proc/1/cmdline', 'rb').read().split(b'\\0'); b'serve' in argv and urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('TRANSFER_SERVE_PORT', '5001'), timeout=4)"]

ENTRYPOINT ["transfer"]
CMD ["--help"]
