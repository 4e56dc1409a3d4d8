# Surfing service image: the API (`python -m app`), the RQ worker (`python -m worker`) and the
# `surfing` CLI. CPU torch by default; the GPU worker builds the same file with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Fashion-MNIST (Debian package, ~30 MB) so `surfing demo` / `surfing train` work in the image;
# build with --build-arg WITH_FASHION_MNIST=0 for a serving-only image.
ARG WITH_FASHION_MNIST=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned, from the chosen index: resolving it as a plain dependency would pull
# the multi-GB CUDA build from PyPI. This layer stays cached while the code changes.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

RUN if [ "${WITH_FASHION_MNIST}" = "1" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends dataset-fashion-mnist \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /srv/surfing
COPY pyproject.toml ./
COPY surfing ./surfing
COPY models_store ./models_store
COPY app ./app
COPY worker ./worker
# Editable, so every entry point (python -m app/worker, surfing, alembic) runs this tree and
# finds alembic.ini + migrations/ next to it.
RUN pip install -e .
COPY alembic.ini ./
COPY migrations ./migrations

RUN useradd --create-home --uid 10001 surfing \
    && mkdir -p /data/models \
    && chown -R surfing /data
USER surfing

ENV SURFING_MODELS_DIR=/data/models \
    SURFING_STATE_DIR=/data

EXPOSE 8000
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
