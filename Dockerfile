# syntax=docker/dockerfile:1
# batch-worker: the production image (docs/deployment.md).
#
#   docker build -t batch-worker:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Two stages: the build stage installs the package and its runtime dependencies into a
# virtualenv; the runtime stage copies only that virtualenv onto the same slim base, so no
# compiler, pip cache or source tree ships. Both stages use one base image: the venv's
# interpreter path (/usr/local/bin/python3.11) must exist unchanged in the runtime stage.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src
# Only what `pip install .` reads (.dockerignore keeps the rest of the tree out).
COPY pyproject.toml README.md ./
COPY worker ./worker
# The `web` extra (shapely, pyproj) for `batch-worker web`'s feature maps; `demo` (moto,
# pika) and `test` are for developers, not for the image.
# pip compiles the bytecode here: the runtime root filesystem is read-only.
RUN pip install /src[web]


FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# bookworm's tini; pinned so a rebuild of the same commit gets the same init.
ARG TINI_VERSION=0.19.0-1+b3

LABEL org.opencontainers.image.title="batch-worker" \
      org.opencontainers.image.description="Message-queue worker daemon for the Sentinel Hub Batch Processing API V2" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deployment.md"

# tini is PID 1: it forwards SIGTERM to the daemon (which hands its jobs back and exits 0
# within GRACE_PERIOD) and reaps any orphaned children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=${TINI_VERSION}" \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 batch-worker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin batch-worker

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BATCH_WORKER_LOG_FORMAT=json

USER 10001:10001

# /metrics, /healthz, /readyz (BATCH_WORKER_METRICS_PORT); `web`: the status API and pages
# (BATCH_WORKER_WEB_PORT). No HEALTHCHECK: Kubernetes probes those endpoints itself.
EXPOSE 9400 8080

ENTRYPOINT ["tini", "--", "batch-worker"]
CMD ["run"]
