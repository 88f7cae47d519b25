# metaprune: the REST API, the workers and the CLI in one image (ENTRYPOINT: `metaprune`).
#   docker build -t metaprune .
#   docker run --rm metaprune --help
# CPU PyTorch by default; for CUDA wheels build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# No secrets live in the image: the database URL, tokens etc. come from the environment.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    METAPRUNE_ARTIFACT_DIR=/var/lib/metaprune/artifacts

WORKDIR /opt/metaprune

# torch first (the largest layer; cached while the project's sources change)
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md alembic.ini ./
COPY pruning ./pruning
COPY metanet ./metanet
COPY app ./app
COPY migrations ./migrations
# editable: app/db.py finds the Alembic scripts in ../migrations beside the `app` package, so
# the sources stay in /opt/metaprune (a plain `pip install .` would leave them behind)
RUN pip install -e .

# non-root user; the artifact folder is created here so that a named volume mounted on it
# starts out owned by that user
RUN useradd --system --create-home --uid 10001 metaprune \
    && mkdir -p /var/lib/metaprune/artifacts \
    && chown -R metaprune:metaprune /var/lib/metaprune
USER metaprune
WORKDIR /home/metaprune

EXPOSE 8000
ENTRYPOINT ["metaprune"]
CMD ["--help"]
