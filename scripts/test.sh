#!/usr/bin/env bash
# Install the project with its test dependencies and run the whole suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m pip install --quiet torch==2.13.0   # the CPU build; an unpinned torch pulls a CUDA build of several GB
"$PYTHON" -m pip install --quiet -e ".[test]"
"$PYTHON" -m ruff check .
"$PYTHON" -m pytest "$@"
