# syntax=docker/dockerfile:1
# marketplace-metering-operator image: `metering-operator run` by default (the operator), or
# `metering-operator emulator ...` (the chart's in-cluster emulator for test clusters).
#
# Build:  make image         (buildah, no daemon; base image made from Debian packages: devtools/image.py)
#         docker build -t marketplace-metering-operator:0.1.0 .
#         docker build --build-arg PYTHON_IMAGE=python:3.12-slim -t ... .
#
# Any base image with `python` (3.11+) and its `venv` module works: python:3.11-slim, or Debian 12's
# python3 + python3-venv + python-is-python3 (what `make image` builds when no registry is reachable).
# PIP_FIND_LINKS / PIP_NO_INDEX are unset unless given: `make image` passes a local wheelhouse so the
# build needs no package index inside the build container; a plain `docker build` uses the index.
# tests/image/test_dockerfile.py checks this recipe; tests/image/test_container.py builds and runs it.

ARG PYTHON_IMAGE=python:3.11-slim

# --- stage 1: build the wheel (only the package; dependencies come from the index at install) ---
FROM ${PYTHON_IMAGE} AS build
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY operator ./operator
# A throw-away virtualenv brings pip, so the base image needs none of its own.
RUN python -m venv /opt/build && /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels .

# --- stage 2: a virtualenv with the wheel and its dependencies, no compilers, no build files ---
FROM ${PYTHON_IMAGE}
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
LABEL org.opencontainers.image.title="marketplace-metering-operator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# HOME: the numeric user has no home directory; /tmp is the one writable place (an emptyDir).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    PATH=/opt/venv/bin:$PATH
# Only the wheel comes from the build stage (about 200 KB). It is copied rather than bind-mounted:
# buildah's layer cache does not see a bind mount's content, and would keep an old install of the
# package under a changed wheel. Then, to keep the image small: pip and setuptools leave (nothing
# installs at run time), botocore keeps the models of the two services the operator and the
# emulator use (the other ~400 are 27 MiB), and the Kubernetes client loses its asyncio copy
# `kubernetes.aio` (42 MiB), which nothing imports.
COPY --from=build /wheels /wheels
RUN python -m venv /opt/venv && /opt/venv/bin/pip install /wheels/*.whl && /opt/venv/bin/pip uninstall --yes pip setuptools && find /opt/venv/lib/python3*/site-packages/botocore/data -mindepth 1 -maxdepth 1 -type d ! -name meteringmarketplace ! -name sts -exec rm -rf {} + && rm -rf /opt/venv/lib/python3*/site-packages/kubernetes/aio
# A numeric non-root user (matches the chart's runAsUser), so runAsNonRoot can be verified.
USER 65532:65532
ENTRYPOINT ["metering-operator"]
CMD ["run"]
