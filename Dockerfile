#
# One image runs every stage of the pipeline, the Prefect flow runs of the Docker work pool,
# and the scoring server (docs/deploy.md has the commands):
#   docker build --network host -t transfer-pipeline:latest .
#   docker run --rm --gpus all -v "$PWD/ws:/workspace" -w /workspace transfer-pipeline:latest pretrain
#   docker run --rm -p 5001:5001 -e MLFLOW_TRACKING_URI=... transfer-pipeline:latest serve
#
# BASE_IMAGE: CUDA 13.0 "base" on Ubuntu 22.04 for GPU hosts. The torch==2.14.1 /
# torchvision==0.29.1 Linux wheels bring their own CUDA user-space libraries (nvidia-* wheels),
# so the base only needs the driver-facing part; a "runtime" base would ship them twice. Any
# Debian/Ubuntu image works (the tests build FROM a local Debian bookworm + Python 3.11 image):
# Python 3.11 is installed from apt when the base lacks it. Host needs an NVIDIA driver for
# CUDA 13 (>= 580) and the NVIDIA container toolkit to see GPUs.
#
# No secret goes in as a build arg (build args are visible in `docker history`): tokens,
# passwords and connection strings are run-time environment only.

ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04
FROM ${BASE_IMAGE}

ARG PYTHON_VERSION=3.11
ARG APP_UID=1000

# Python from the base when it has it, else from apt (Ubuntu 22.04 ships python3.11 in
# universe). Not pinned: apt packages follow the base image's release.
# hadolint ignore=DL3008
RUN if ! command -v "python${PYTHON_VERSION}" > /dev/null \
         || ! "python${PYTHON_VERSION}" -c "import ensurepip, venv" 2> /dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            ca-certificates "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && "python${PYTHON_VERSION}" -m venv /opt/venv \
    && groupadd --gid "${APP_UID}" app \
    && useradd --create-home --uid "${APP_UID}" --gid "${APP_UID}" --shell /usr/sbin/nologin app

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Where pip finds the pinned wheels: a mirror of local wheel directories, an extra index, a
# constraints file (URLs). Unset = PyPI. Not secrets: visible in `docker history`.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CONSTRAINT
# Extras of pyproject.toml baked in: "docker" = prefect-docker, for the work-pool worker.
ARG EXTRAS=docker

# Dependencies first (the pins of pyproject.toml, read with tomllib), so a code change does
# not reinstall torch: only the layers below are rebuilt. setuptools/wheel: bounded as in
# [build-system] (the code layer builds without isolation, offline).
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ.get('EXTRAS', '').split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
    && pip install --quiet "setuptools>=68" wheel \
    && pip install --quiet -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project: packages, flows, params, dvc.yaml, prefect.yaml (see .dockerignore).
COPY . .
RUN pip install --quiet --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && mkdir -p data mlruns artifacts models metrics \
    && chown -R app:app data mlruns artifacts models metrics

USER ${APP_UID}:${APP_UID}

# Containers bind the scoring server to all interfaces (serve.host defaults to loopback);
# MLflow tracking defaults to sqlite under ./mlruns: mount a volume or set
# MLFLOW_TRACKING_URI. Caches (matplotlib, Prefect's home) live in the user's home, so a
# read-only root filesystem needs a tmpfs on /home/app and /tmp (docs/deploy.md).
ENV TRANSFER_SERVE_HOST=0.0.0.0 \
    TRANSFER_SERVE_PORT=5001 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/app

EXPOSE 5001

# Healthy when the scoring server answers /ping; containers running a batch stage
# (pretrain, finetune...) serve nothing and always report healthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; argv = open('/proc/1/cmdline', 'rb').read().split(b'\\0'); b'serve' in argv and urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('TRANSFER_SERVE_PORT', '5001'), timeout=4)"]

ENTRYPOINT ["transfer"]
CMD ["--help"]
