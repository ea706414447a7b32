#!/usr/bin/env bash
# CI for the CPU harness beyond tests/run.sh (which runs tests/cudacpu plainly): the sanitizer runs, then the
# mutation check that proves the harness fails on injected kernel bugs.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if ! command -v "${CXX:-g++}" > /dev/null; then
  echo "tests/cudacpu/ci.sh: no C++ compiler (${CXX:-g++}): the CPU harness cannot run" >&2
  exit 1
fi
bash tests/cudacpu/sanitize.sh
"$PYTHON" tests/cudacpu/mutate.py --sanitizers-checked
