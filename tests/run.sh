#!/usr/bin/env bash
# Set up and run the test suite from a fresh checkout:
#   bash tests/run.sh [pytest args]
# Creates .venv (if missing), installs torch 2.14.1 and memdec_fast with its test
# extras (this builds the compiled extension), then runs pytest against the
# installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1"
python -m pip install -q ".[test]"
# `pytest` (not `python -m pytest`) keeps the checkout off sys.path, so the
# installed package, with its compiled extension, is the one under test.
exec pytest -q "$@"
