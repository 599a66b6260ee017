#!/usr/bin/env bash
# The default experiment under N seeds, then the aggregate report (mean ± std, 95% CI, claims).
# Usage: scripts/seeds.sh N [WORKDIR_ROOT] [--noshare_upstream] [--config=FILE[:ARG]] [--config.key=value ...]
# Seed k runs in WORKDIR_ROOT/seed_k with --config.sweep.seed=k; the upstream model is shared
# across seeds (the paper's setting) unless --noshare_upstream. Writes WORKDIR_ROOT/aggregate.md.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: scripts/seeds.sh N [WORKDIR_ROOT] [flags]}
shift
ROOT=workdirs/seeds
if [[ $# -gt 0 && $1 != --* ]]; then
  ROOT=$1
  shift
fi
exec .venv/bin/python -m soup.aggregate --seeds="$N" --root="$ROOT" "$@"
