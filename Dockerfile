# syntax=docker/dockerfile:1
# work-sidecar: the local gRPC sidecar that alone talks to the Work API for the sandboxes beside it.
#
#   docker build -t work-sidecar:0.1.0 .
#   docker run --rm -v work-sidecar-sock:/var/run/work-sidecar \
#     -e WORK_SIDECAR_API_URL=https://… -e WORK_SIDECAR_ENVIRONMENT_ID=env_… -e WORK_SIDECAR_API_KEY \
#     work-sidecar:0.1.0
#
# Configured by environment only: every `work-sidecar serve` flag has a WORK_SIDECAR_* variable
# (`docker run --rm work-sidecar:0.1.0 serve --help` lists them). tests/deploy/ lints this file, checks its
# structure and runs its ENTRYPOINT/CMD with its ENV through a drain; `make image-test` builds it unchanged and runs
# the image as `docker run` does and as every manifest in deploy/ does (docs/deployment.md).

# One base for both stages, pinned by tag (Python minor + Debian release); pin a digest with
# --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:… for byte-for-byte rebuilds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: build the wheel and install it with the sidecar's dependencies (the `server` extra) into a venv ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/work-sidecar
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
# Every dependency ships manylinux wheels (grpcio, uvloop, httptools, …): no compiler is needed here either.
# Then the installers leave the venv: the runtime needs neither pip nor setuptools, nor grpcio-tools (protoc, for
# regenerating code that is committed already).
RUN /opt/work-sidecar/bin/pip install --no-cache-dir --no-compile '/src[server]' \
 && /opt/work-sidecar/bin/pip uninstall --yes grpcio-tools setuptools pip \
 && /opt/work-sidecar/bin/python -m compileall -q /opt/work-sidecar/lib \
 && /opt/work-sidecar/bin/work-sidecar --version \
 && /opt/work-sidecar/bin/work-sidecar serve --help > /dev/null

# ---- final: the slim runtime, the venv and nothing else -------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="work-sidecar" \
      org.opencontainers.image.description="Local gRPC sidecar that owns the self-hosted Work API loop (poll, ack, heartbeat CAS, stop) for sandboxes in any language" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# A fixed numeric UID/GID so Kubernetes can verify runAsNonRoot, and so a sandbox container can run as the
# same user: the Unix socket is created 0600 (only its owner may connect).
# The base's own installers go too (its pip, setuptools and wheel, and ensurepip's bundled copies): the image runs
# the sidecar, it installs nothing.
RUN groupadd --system --gid 10001 work-sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin work-sidecar \
 && rm -rf /usr/local/bin/pip /usr/local/bin/pip3 /usr/local/bin/pip3.* /usr/local/bin/wheel \
      /usr/local/lib/python3*/site-packages/pip /usr/local/lib/python3*/site-packages/pip-* \
      /usr/local/lib/python3*/site-packages/setuptools /usr/local/lib/python3*/site-packages/setuptools-* \
      /usr/local/lib/python3*/site-packages/_distutils_hack /usr/local/lib/python3*/site-packages/distutils-precedence.pth \
      /usr/local/lib/python3*/site-packages/wheel /usr/local/lib/python3*/site-packages/wheel-* \
      /usr/local/lib/python3*/site-packages/pkg_resources \
      /usr/local/lib/python3*/ensurepip/_bundled /usr/lib/python3*/ensurepip/_bundled /usr/share/python-wheels \
 && mkdir -p /var/run/work-sidecar /var/lib/work-sidecar \
 && chown 10001:10001 /var/run/work-sidecar /var/lib/work-sidecar \
 && chmod 0700 /var/run/work-sidecar /var/lib/work-sidecar

COPY --from=builder /opt/work-sidecar /opt/work-sidecar

ENV PATH=/opt/work-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The sandbox reaches the sidecar through a Unix socket in a shared volume (an emptyDir in Kubernetes, a
# named volume with Docker) and over loopback TCP, which containers sharing the network namespace (a pod,
# `docker run --network container:…`) reach as well. No token is needed: nothing outside the pod or the
# shared namespace can connect. To listen on 0.0.0.0 instead, also set WORK_SIDECAR_AUTH_TOKEN: the sidecar
# refuses non-loopback TCP without one (gRPC health and reflection stay open, for probes).
ENV WORK_SIDECAR_LISTEN=unix:///var/run/work-sidecar/sidecar.sock,127.0.0.1:50051
# Log lines are JSON objects whether or not a TTY is attached (`docker run -t`).
ENV WORK_SIDECAR_LOG_FORMAT=json
# SIGTERM drains: health NOT_SERVING, sandboxes told Draining, leases renewed until stopped or this many
# seconds pass, then exit 0. Keep `docker stop --time` / terminationGracePeriodSeconds above it.
ENV WORK_SIDECAR_DRAIN_TIMEOUT=30
# Without WORK_SIDECAR_API_URL the sidecar starts its embedded emulator (demo mode: `docker run` alone works);
# a real deployment sets WORK_SIDECAR_API_URL, WORK_SIDECAR_ENVIRONMENT_ID and WORK_SIDECAR_API_KEY (the
# key from a secret, never baked into an image).
ENV WORK_SIDECAR_PROVIDER=anthropic
# Leases survive a crash or restart of the sidecar: the lease journal and the token key live here (0700, never
# shared with the sandbox). A volume: `docker restart` (same container) keeps it, a new `docker run` starts
# empty; in Kubernetes an emptyDir survives a container restart, not a pod deletion. '' turns it off.
ENV WORK_SIDECAR_STATE_DIR=/var/lib/work-sidecar

USER 10001:10001
VOLUME ["/var/run/work-sidecar", "/var/lib/work-sidecar"]
# gRPC (loopback by default, see WORK_SIDECAR_LISTEN above).
EXPOSE 50051

# The drain begins on SIGTERM (a second SIGTERM exits at once with status 1).
STOPSIGNAL SIGTERM
# gRPC health over the Unix socket: exits 0 only while SERVING (NOT_SERVING while draining).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["work-sidecar", "health", "--sidecar", "unix:///var/run/work-sidecar/sidecar.sock", "--timeout", "3"]

# Exec form: work-sidecar is PID 1 and receives the stop signal itself (no shell in between).
ENTRYPOINT ["work-sidecar"]
CMD ["serve"]
