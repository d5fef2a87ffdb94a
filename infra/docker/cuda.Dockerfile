# syntax=docker/dockerfile:1
# The CUDA image: every Sluice service, onnxruntime-genai-cuda over onnxruntime-gpu with CUDA 13
# and cuDNN from PyPI wheels, so the host needs only the NVIDIA driver (>= 580) and the NVIDIA
# container toolkit: docker run --gpus all ... (compose: the gpu profile).
#
#   docker build -f infra/docker/cuda.Dockerfile -t sluice:cuda .
#   docker run --rm sluice:cuda sluice run preprocess
#
# Two stages: the build stage installs into /opt/sluice with infra/docker/install.sh (the same
# script CI runs in a fresh venv), pinned by infra/docker/constraints.txt; the runtime stage
# copies that venv alone and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY pipeline pipeline
COPY stages stages
COPY replay replay
COPY sluice sluice
COPY infra infra
COPY models models
RUN bash infra/docker/install.sh /opt/sluice cuda /src \
    && cp infra/docker/healthcheck.py /opt/sluice/healthcheck.py

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/sluice /opt/sluice
# The CUDA and cuDNN libraries live in the nvidia-* wheels: let the loader find them.
RUN find /opt/sluice -type d -path '*/site-packages/nvidia/*/lib' > /etc/ld.so.conf.d/sluice-nvidia.conf \
    && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /var/lib/sluice --create-home sluice
ENV PATH=/opt/sluice/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SLUICE_STATE_DIR=/var/lib/sluice \
    SLUICE_HTTP_HOST=0.0.0.0 \
    SLUICE_HTTP_PORT=9400
USER 10001:10001
WORKDIR /var/lib/sluice
EXPOSE 9400
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=6 \
    CMD ["/opt/sluice/bin/python", "/opt/sluice/healthcheck.py"]
CMD ["sluice", "--help"]
