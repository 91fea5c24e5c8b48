# DM-FNet fusion service. Multi-stage: build a venv, copy it into a clean runtime image of the same base.
#
#   GPU (default):  docker build -t dmfnet:gpu .
#   CPU:            docker build -t dmfnet:cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   offline/local:  put a torch wheel in docker/wheels/ (docker/smoke.sh does) - it is preferred when present.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Networks with a TLS-intercepting proxy: docker/build-certs/ca.crt (if present) is trusted in this build stage
# only; the runtime stage starts from the clean base.
COPY docker/build-certs/ /tmp/certs/
RUN if [ -s /tmp/certs/ca.crt ]; then cat /tmp/certs/ca.crt >> /etc/ssl/certs/ca-certificates.crt; fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY docker/wheels/ /tmp/wheels/
# torch first, pinned, so nothing else pulls a different build: a local wheel if given, else the index
# (PyPI's Linux wheel is the CUDA build, right for the CUDA base; pass the CPU index for CPU bases).
RUN if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then pip install --find-links /tmp/wheels "torch==${TORCH_VERSION}"; \
    elif [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    else pip install "torch==${TORCH_VERSION}"; fi
# Dependencies before the code, so a code (or README) change rebuilds only the small last layers.
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /tmp/requirements.txt && pip install -r /tmp/requirements.txt && rm -rf /tmp/wheels
COPY README.md /src/
COPY app /src/app
COPY models /src/models
COPY dmfnet /src/dmfnet
RUN pip install --no-deps /src

FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG WEIGHTS_SHA256=unknown
LABEL org.opencontainers.image.title="dmfnet" \
      org.opencontainers.image.description="DM-FNet multimodal medical image fusion service (derived images, not for primary diagnosis)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://example.invalid/dmfnet" \
      org.opencontainers.image.licenses="MIT" \
      io.dmfnet.weights.sha256="${WEIGHTS_SHA256}"
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /srv/dmfnet --create-home dmfnet
COPY --from=build /opt/venv /opt/venv
# The package reads its shipped weights from <repo>/weights next to models/: keep that layout.
COPY --chown=root:root weights /srv/dmfnet/weights
COPY --chown=root:root app /srv/dmfnet/app
COPY --chown=root:root models /srv/dmfnet/models
COPY --chown=root:root dmfnet /srv/dmfnet/dmfnet
WORKDIR /srv/dmfnet
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/srv/dmfnet PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DMFNET_HOST=0.0.0.0 DMFNET_PORT=8000 DMFNET_LOG_JSON=true
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DMFNET_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["dmfnet", "serve"]
