# syntax=docker/dockerfile:1
#
# ci-gateway container image.
#
#   docker build -t ci-gateway:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -p 9090:9090 --env-file gateway.env ci-gateway:0.1.0
#
# Two stages on the same pinned base: "build" turns the source tree into wheels (the project's and
# every dependency's), "runtime" installs those wheels from a read-only bind mount, so no source
# tree, build tool, pip cache or test ends up in the final image. The build context is whatever
# .dockerignore lets through (an allow-list: pyproject.toml, README.md, LICENSE, gateway/).
#
# The base is pinned to a full version tag (Debian 12, like the development machines). For a
# byte-for-byte reproducible base, also pin its digest (python:3.12.12-slim-bookworm@sha256:...)
# and let a bot such as Renovate keep tag and digest current.

FROM python:3.12.12-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY . .
# --only-binary for the dependencies: the runtime stage has no compiler, and every dependency
# publishes manylinux wheels; the project itself is pure Python and is built here from source.
RUN python -m pip wheel --wheel-dir /wheels --only-binary=:all: --no-binary=ci-gateway .


FROM python:3.12.12-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="ci-gateway" \
      org.opencontainers.image.description="Authenticating sidecar for APIs behind Microsoft Entra ID and Azure API Management" \
      org.opencontainers.image.licenses="MIT"

# No .pyc written at run time (the root filesystem is read-only; pip compiled them at install),
# logs unbuffered, and HOME inside the only writable path since UID 65532 has no passwd entry.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

# Install from the build stage's wheels only (--no-index: nothing is fetched here), then remove
# pip itself: the running image needs no package manager.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels /wheels/ci_gateway-*.whl \
    && python -m pip uninstall --yes pip \
    && rm -rf /root/.cache

# A fixed numeric UID/GID (the "nonroot" 65532 used by distroless images): Kubernetes can verify
# runAsNonRoot only for a numeric USER, and fixed IDs make file permissions predictable.
USER 65532:65532
WORKDIR /tmp

EXPOSE 8080 9090
STOPSIGNAL SIGTERM

# Docker/Podman health check (Kubernetes ignores it and uses the chart's probes): standard library
# only, against the admin listener from CIGW_ADMIN_LISTEN (default 0.0.0.0:9090; a wildcard
# address is reached through loopback). urlopen raises on any non-2xx answer, so exit code 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; host, _, port = os.environ.get('CIGW_ADMIN_LISTEN', '0.0.0.0:9090').rpartition(':'); host = '127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host; urllib.request.urlopen(f'http://{host}:{port}/healthz', timeout=3)"]

ENTRYPOINT ["ci-gateway"]
CMD ["serve"]
