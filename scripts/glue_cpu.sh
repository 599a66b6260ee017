#!/usr/bin/env bash
# The CPU-sized GLUE runs (configs/glue_bert.py:TASK,cpu with all-MiniLM-L6-v2) of
# experiments/glue_minilm, one task after another. Resumable: rerun the same command and
# every finished member, evaluation and soup is kept. Usage:
#   scripts/glue_cpu.sh [ROOT] [TASK ...]     (default: workdirs/glue_cpu sst2 cola rte)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/glue_cpu}
shift || true
TASKS=${*:-sst2 cola rte}
scripts/get_minilm.sh
for task in $TASKS; do
  echo "[glue] $task -> $ROOT/$task ($(date -u +%H:%M:%S))"
  .venv/bin/python -m soup.main --config="configs/glue_bert.py:$task,cpu" --workdir="$ROOT/$task"
done
echo "[glue] done ($(date -u +%H:%M:%S))"
