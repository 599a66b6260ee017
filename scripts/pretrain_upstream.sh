#!/usr/bin/env bash
# Re-makes the default experiment's pretrained start, soup/models/weights/fashion_mnist_vit.npz:
# the upstream stage of configs/fashion_mnist.py:upstream_here (12 epochs on the 48,000 upstream
# images, 8-9 minutes on 2 cores), exported as a big_vision .npz with its provenance .json.
# The same machine gives the same bytes; another machine may differ in the last bits.
# Usage: scripts/pretrain_upstream.sh [WORKDIR] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
WORKDIR=${1:-workdirs/fashion_mnist_upstream}
OUT=${2:-soup/models/weights/fashion_mnist_vit.npz}
COMMAND=".venv/bin/python -m soup.main --config=configs/fashion_mnist.py:upstream_here --workdir=$WORKDIR --config.stages=pretrain"
$COMMAND
.venv/bin/python -m soup.models.export --workdir="$WORKDIR" --out="$OUT" --command="$COMMAND"
