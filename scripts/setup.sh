#!/usr/bin/env bash
# Idempotent set-up: Debian's Fashion-MNIST, a pinned virtualenv at .venv, and
# TFDS fashion_mnist prepared offline. Each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
STAMP=.venv/.requirements.sha256
WANT=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] creating .venv from requirements.txt"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$WANT" > "$STAMP"
fi

export TFDS_DATA_DIR=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
.venv/bin/python -m soup.data.prepare --data_dir="$TFDS_DATA_DIR" 2>&1 | grep -v "^WARNING" | tail -1
