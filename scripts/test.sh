#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite. Arguments go to pytest, e.g.
#   scripts/test.sh -k signaling
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra "$@"
