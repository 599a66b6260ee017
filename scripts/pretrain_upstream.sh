#!/usr/bin/env bash
# Re-makes the default experiment's pretrained start, soup/models/weights/fashion_mnist_vit.npz:
# the upstream stage of configs/fashion_mnist.py:upstream_here, self-supervised (SimCLR, no
# labels read) on the 58,000 training images that are not held out (12 epochs, batch 256;
# 936 s, about 16 minutes, measured on 2 cores beside other jobs), exported as a big_vision
# .npz with its provenance .json. The same machine gives the same bytes; another may differ in the last bits.
# `:supervised_upstream` loads the earlier start instead, fashion_mnist_vit_supervised.npz
# (remade with CONFIG=configs/fashion_mnist.py:supervised_upstream,upstream_here and that OUT).
# Usage: scripts/pretrain_upstream.sh [WORKDIR] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
WORKDIR=${1:-workdirs/fashion_mnist_upstream}
OUT=${2:-soup/models/weights/fashion_mnist_vit.npz}
CONFIG=${CONFIG:-configs/fashion_mnist.py:upstream_here}
COMMAND=".venv/bin/python -m soup.main --config=$CONFIG --workdir=$WORKDIR --config.stages=pretrain"
START=$(date +%s)
$COMMAND
echo "[pretrain_upstream] pretraining took $(( $(date +%s) - START )) s"
.venv/bin/python -m soup.models.export --workdir="$WORKDIR" --out="$OUT" --command="$COMMAND"
