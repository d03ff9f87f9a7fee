# syntax=docker/dockerfile:1
# marketplace-metering-operator image: `metering-operator run` by default (the operator), or
# `metering-operator emulator ...` (the chart's in-cluster emulator for test clusters).
#
# Build:  docker build -t marketplace-metering-operator:0.1.0 .
#         docker build --build-arg PYTHON_IMAGE=python:3.12-slim -t ... .
#
# tests/chart/test_wheel.py runs this file's RUN steps (parsed from here) outside Docker, because
# the project's machines have no Docker: keep each step a single shell command line.

ARG PYTHON_IMAGE=python:3.11-slim

# --- stage 1: build the wheel (only the package; dependencies come from the index at install) ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# --- stage 2: a virtualenv with the wheel and its dependencies, no compilers, no build files ---
FROM ${PYTHON_IMAGE}
# HOME: the numeric user has no home directory; /tmp is the one writable place (an emptyDir).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    PATH=/opt/venv/bin:$PATH
# The wheel is bind-mounted from the build stage, so no layer keeps a copy of it. Then, to keep the
# image small: pip and setuptools leave (nothing installs at run time), and botocore keeps the models
# of the two services the operator and the emulator use (the other ~400 are 27 MiB).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels python -m venv /opt/venv && /opt/venv/bin/pip install /wheels/*.whl && /opt/venv/bin/pip uninstall --yes pip setuptools && find /opt/venv/lib/python3*/site-packages/botocore/data -mindepth 1 -maxdepth 1 -type d ! -name meteringmarketplace ! -name sts -exec rm -rf {} +
# A numeric non-root user (matches the chart's runAsUser), so runAsNonRoot can be verified.
USER 65532:65532
ENTRYPOINT ["metering-operator"]
CMD ["run"]
