#!/usr/bin/env bash
# Install everything the suite needs (scripts/setup.sh dev), then lint, type-check and test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export OMP_NUM_THREADS=1
# operator/ at the top would shadow the stdlib module for `python -m`/`-c` children started here.
export PYTHONSAFEPATH=1
echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] mypy"
# own cache: ad-hoc `mypy operator` runs leave a cache that makes this run report false errors
.venv/bin/mypy --cache-dir .mypy_cache/suite src operator runtime
echo "[test] pytest"
set +e
.venv/bin/python -m pytest -ra --durations=25 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing the run" >&2
  exit 1
fi
exit "$rc"
