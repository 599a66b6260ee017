#!/usr/bin/env bash
# The embedded default experiment, from nothing to report.md and figure.png.
# Usage: scripts/demo.sh [WORKDIR] [extra soup.main flags, e.g. --config.sweep.num_members=24]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
WORKDIR=${1:-workdirs/fashion_mnist}
shift || true
exec .venv/bin/python -m soup.main --config=configs/fashion_mnist.py --workdir="$WORKDIR" "$@"
