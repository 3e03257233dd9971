# syntax=docker/dockerfile:1
# initserve: a CPU image by default (target `cpu`), a CUDA image from the same file (target `gpu`).
#   docker build -t initserve:cpu .
#   docker build --target gpu -t initserve:gpu .
# One uvicorn worker per process (one generator, and on a GPU one CUDA context, per process);
# scale with replicas, not workers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: compile the C kernels into a wheel (the only stage with a compiler) ------------------
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY service ./service
COPY clients/python ./clients/python
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . ./clients/python

# --- cpu: the runtime image ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin initserve
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/initserve-*.whl /wheels/initserve_client-*.whl \
    && rm -rf /wheels
ENV INITSERVE_HOST=0.0.0.0 \
    INITSERVE_PORT=8000 \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2).status != 200)"]
ENTRYPOINT ["initserve"]
CMD ["serve"]

# --- gpu: the same image plus CuPy (CUDA 12 runtime and NVRTC from PyPI; the driver comes from
# the container runtime, e.g. the NVIDIA container toolkit) -------------------------------------
FROM cpu AS gpu
USER 0
RUN pip install --no-cache-dir "cupy-cuda12x[ctk]==14.2.0"
ENV INITSERVE_BACKEND=gpu
USER 10001
