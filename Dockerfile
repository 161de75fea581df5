# syntax=docker/dockerfile:1
#
# sop-llm image: wheels are built in one stage, only the wheels are installed in the next, and
# the process runs as an unprivileged user. See docs/operations.md.
#
#   docker build -t sop-llm .                          # the executor (remote models, echo)
#   docker build --target local -t sop-llm:local .     # + llama.cpp (llama-cpp-python, CPU)
#
# The default target is the last stage (`runtime`); BuildKit builds only the stages a target
# needs, so the slow llama.cpp compile happens only for `--target local`.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: wheels of sop-llm and every dependency -------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sop_llm ./sop_llm
COPY schemas ./schemas
COPY streams ./streams
COPY providers ./providers
COPY gpu ./gpu
COPY handlers ./handlers
COPY ops ./ops
RUN pip wheel --wheel-dir /wheels ".[fast]"

# ---- builder-local: the same plus llama-cpp-python, compiled here --------------------------------
FROM builder AS builder-local
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# GGML_NATIVE=OFF: no -march=native, so the image runs on any x86-64 host, not just the builder's
# CPU. A CUDA build needs a CUDA base image and e.g. CMAKE_ARGS="-DGGML_CUDA=ON".
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN CMAKE_ARGS="${CMAKE_ARGS}" pip wheel --wheel-dir /wheels --find-links /wheels ".[fast,local]"

# ---- base: what both runtime images share -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# a fixed numeric uid, so orchestrators can check runAsNonRoot without a passwd lookup
RUN groupadd --system --gid 10001 sop \
    && useradd --system --uid 10001 --gid sop --home-dir /home/sop --create-home \
        --shell /usr/sbin/nologin sop
WORKDIR /home/sop
EXPOSE 8080

# ---- local: runtime with llama.cpp ---------------------------------------------------------------
FROM base AS local
# llama.cpp's CPU backend is built with OpenMP
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=builder-local,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "sop-llm[fast,local]"
USER 10001:10001
ENTRYPOINT ["sop-llm"]
CMD ["worker"]

# ---- runtime (default): only the wheels, no compiler, no sources -----------------------------------
FROM base AS runtime
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "sop-llm[fast]"
USER 10001:10001
ENTRYPOINT ["sop-llm"]
CMD ["worker"]
