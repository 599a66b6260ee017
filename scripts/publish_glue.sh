#!/usr/bin/env bash
# Copies the light outputs of the GLUE runs (scripts/glue_cpu.sh ROOT) into experiments/NAME:
# per task the report, results, sweep, config, figures and stage times. Checkpoints and logits
# stay in the workdirs. Usage: scripts/publish_glue.sh ROOT experiments/NAME
set -euo pipefail
SRC=${1:?usage: scripts/publish_glue.sh ROOT experiments/NAME}
DEST=${2:?usage: scripts/publish_glue.sh ROOT experiments/NAME}
for run in "$SRC"/*/; do
  task=$(basename "$run")
  [ -f "$run/results.jsonl" ] || { echo "skip $task: no results.jsonl yet"; continue; }
  mkdir -p "$DEST/$task"
  for f in report.md results.jsonl sweep.json config.json figure.png landscape.png \
           ingredients.png analysis.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$DEST/$task"/
  done
  # Every stage time the task's runs logged (a resumed run logs its stages again).
  grep -a "stage .* done in" "$run/log.txt" | sed "s/.*INFO //" > "$DEST/$task/stage_times.txt"
done
echo "published $SRC -> $DEST"
