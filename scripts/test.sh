#!/usr/bin/env bash
# Set-up (as scripts/demo.sh), the test-only requirements, lint (ruff), then the
# test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Test-only dependencies (reference libraries, linters, the sweep launcher's
# client), each file re-installed only when its hash changes.
# requirements-test-nodeps.txt: packages whose declared dependencies are not needed.
for req in requirements-test.txt requirements-launch.txt requirements-test-nodeps.txt; do
  [ -f "$req" ] || continue
  stamp=.venv/.${req%.txt}.sha256
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[test] installing $req"
    nodeps=""; [ "$req" = requirements-test-nodeps.txt ] && nodeps="--no-deps"
    .venv/bin/python -m pip install -q $nodeps -r "$req"
    echo "$want" > "$stamp"
  fi
done
# Lint (ruff.toml) before the tests: a lint error fails the run.
.venv/bin/python -m ruff check .
# One worker per core, at most 4 (pytest-xdist); a test file stays on one worker, so a module's
# fixtures (the smoke run's workdir) are built once. `-n 0` runs in this process.
exec .venv/bin/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile "$@"
