# syntax=docker/dockerfile:1
# The CPU image: every Sluice service (the command picks one), onnxruntime-genai on CPU, the demo model.
#
#   docker build -f infra/docker/cpu.Dockerfile -t sluice:cpu .
#   docker run --rm sluice:cpu sluice run preprocess
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
RUN bash infra/docker/install.sh /opt/sluice cpu /src \
    && cp infra/docker/healthcheck.py /opt/sluice/healthcheck.py

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/sluice /opt/sluice
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
