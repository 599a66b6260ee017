#!/usr/bin/env bash
# One-shot GPU benchmark: ViT-B/32 bf16 train step (images/s, MFU) and the
# averaging bandwidth of soup.soups.average.stream_average on the GPU.
#
#   bash benchmarks/gpu.sh                      # needs a GPU and a CUDA jax
#   bash benchmarks/gpu.sh --peak-tflops 989    # if the device kind is not in the table
#   bash benchmarks/gpu.sh --tiny               # small model, any backend (checks the script)
#
# Setup (once, in this repo's environment): pip install -r requirements.txt, then a
# CUDA build of the same jax version, e.g. pip install -U "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')".
# Prints two markdown tables and writes benchmarks/results/gpu.json (gpu_tiny.json with --tiny).
# Set PYTHON to choose the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."  # The repository root: python -m benchmarks.gpu_bench runs from here.
PY=${PYTHON:-python}

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
  echo "nvidia-smi: not found"
fi
"$PY" -c "import jax; print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices())"

if [[ " $* " != *" --tiny "* ]]; then
  "$PY" - <<'PYEOF'
import sys, jax
if jax.default_backend() != "gpu":
  sys.exit(f"jax sees no GPU (backend {jax.default_backend()!r}): install a CUDA build of jax, "
           "e.g. pip install -U 'jax[cuda12]', or run with --tiny to check the script on the CPU.")
PYEOF
fi
exec "$PY" -m benchmarks.gpu_bench "$@"
