#!/usr/bin/env bash
# Copies the light outputs of a seeds root (scripts/seeds.sh) into experiments/<name>: the
# aggregate, the command, and per seed the report, results, sweep, wall and stage times; the
# first seed's figures and config too. Checkpoints and logits stay in the workdirs.
# Usage: scripts/publish_runs.sh WORKDIR_ROOT experiments/NAME
set -euo pipefail
SRC=${1:?usage: scripts/publish_runs.sh WORKDIR_ROOT experiments/NAME}
DEST=${2:?usage: scripts/publish_runs.sh WORKDIR_ROOT experiments/NAME}
mkdir -p "$DEST"
cp "$SRC"/aggregate.md "$SRC"/aggregate.json "$SRC"/command.txt "$DEST"/
for run in "$SRC"/seed_*; do
  seed=$(basename "$run")
  mkdir -p "$DEST/$seed"
  cp "$run"/report.md "$run"/results.jsonl "$run"/sweep.json "$run"/wall_seconds.txt "$DEST/$seed"/
  # The last run's stage times (a resumed run logs each stage again).
  grep -a "stage .* done" "$run/log.txt" | sed 's/.*INFO //' | tail -6 > "$DEST/$seed/stage_times.txt"
  if [ "$seed" = seed_0 ]; then
    for f in figure.png landscape.png ingredients.png analysis.json config.json; do
      [ -f "$run/$f" ] && cp "$run/$f" "$DEST/$seed"/
    done
  fi
done
echo "published $SRC -> $DEST"
