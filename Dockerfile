# syntax=docker/dockerfile:1
# The services image: `edgeflow serve candidates|features|scoring|merging|gateway`, and the
# per-workflow nearline worker and offline job the operator creates.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, exactly as locked (versions and hashes), so a code change reuses the
# cached dependency layer.
COPY requirements/runtime.lock ./requirements/
RUN pip install --require-hashes --no-deps -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY services ./services
COPY operator ./operator
# Bytecode compiled once here, valid whatever the copied files' times: the image runs with
# PYTHONDONTWRITEBYTECODE as a user who cannot write it, so without it every process would
# compile all it imports at each start, and a module first imported by a request would
# stall that request.
RUN pip install --no-deps --no-build-isolation . \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN groupadd --system --gid 10001 edgeflow \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin edgeflow
COPY --from=build /opt/venv /opt/venv
COPY feature_repo /app/feature_repo
COPY workflows /app/workflows
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEFLOW_HOME=/var/lib/edgeflow \
    BIND_HOST=0.0.0.0 \
    METRICS_HOST=0.0.0.0 \
    EDGEFLOW_WORKFLOWS=/app/workflows \
    EDGEFLOW_FEATURE_REPO_TEMPLATE=/app/feature_repo
WORKDIR /app
USER 10001:10001
EXPOSE 50060 50061 50062 50063 50064 50065 9090
ENTRYPOINT ["edgeflow"]
CMD ["--help"]
