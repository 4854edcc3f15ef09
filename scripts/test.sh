#!/usr/bin/env bash
# Install the project with its test dependencies and run the whole suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# torch first, pinned: on these machines pip finds the CPU wheel of 2.13.0 locally; an unpinned torch pulls a
# CUDA build of several GB (on other machines, choose your build from pytorch.org
# first; any torch >= 2.6 works, as pyproject.toml says).
"$PYTHON" -m pip install --quiet torch==2.13.0
"$PYTHON" -m pip install --quiet -e ".[test]"
"$PYTHON" -m ruff check .
"$PYTHON" -m pytest "$@"
