#!/usr/bin/env bash
# Create the virtual environment and install metaprune with its test tools (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${METAPRUNE_FASHION_MNIST_DIR:-}" ]; then
    echo "setup: installing Fashion-MNIST (dataset-fashion-mnist)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
    else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi
fi
stamp="$VENV/.metaprune-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch/torchvision pinned to the builds this project is tested with (pyproject holds ranges)
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
    "$VENV/bin/python" -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
