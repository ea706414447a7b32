#!/usr/bin/env bash
# Run the test suite against memdec_fast installed in this Python environment, then (on a full run) the vLLM
# plugin's suite on vLLM's CPU build in an environment of its own (tests/vllm/run.sh):
#   bash tests/run.sh [pytest args]
# Pytest args run the main suite only; MEMDEC_FAST_VLLM_TESTS=0 skips the vLLM suite.
# If the installed memdec_fast was built from this checkout (the README's `pip install .`, compared by source
# digest, or an editable install of it), that build is reused: nothing is compiled twice. Otherwise the checkout
# is installed first, which compiles the extension. The test extras come from the package's own metadata.
# PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
OUTSIDE=$(mktemp -d)  # run Python from here, so that the checkout does not shadow the installed package
trap 'rm -rf "$OUTSIDE"' EXIT

installed_state() {
  (cd "$OUTSIDE" && "$PYTHON" - "$ROOT" <<'PY' 2>/dev/null) || echo none
import os, sys
import memdec_fast
root = os.path.realpath(sys.argv[1])
if os.path.realpath(memdec_fast.__file__).startswith(os.path.join(root, "")):
    print("editable")
else:
    info = memdec_fast.build_info()
    if os.environ.get("MEMDEC_FAST_CUDA") == "1" and not info.get("cuda"):
        print("a-build-without-CUDA-kernels")  # MEMDEC_FAST_CUDA=1 asks for them: install again
    else:
        print(info.get("source_digest", "unknown"))
PY
}

state=$(installed_state)
want=$("$PYTHON" source_digest.py "$ROOT")
if [ "$state" = editable ]; then
  echo "tests/run.sh: testing the editable install of this checkout (rebuild the extension yourself after C++ changes)"
elif [ "$state" = "$want" ]; then
  echo "tests/run.sh: reusing the installed build of this checkout (source digest $want)"
else
  echo "tests/run.sh: installing this checkout (installed: $state, checkout: $want); this compiles the extension"
  "$PYTHON" -m pip install -v .  # -v: pip shows the build's progress lines ("memdec_fast: compiled 2/5 (108 s)")
fi
extras=$(cd "$OUTSIDE" && "$PYTHON" - <<'PY'
import re
from importlib.metadata import requires
for r in requires("memdec_fast") or []:
    if re.search(r"""extra\s*==\s*["']test["']""", r):
        print(r.split(";")[0].strip())
PY
)
# shellcheck disable=SC2086
"$PYTHON" -m pip install -q $extras
# pytest from outside the checkout's import path: the installed package, with its compiled extension, is tested
"$PYTHON" -c 'import sys; sys.path.pop(0); import pytest; sys.exit(pytest.main(sys.argv[1:]))' -q "$@"
if [ $# -eq 0 ] && [ "${MEMDEC_FAST_VLLM_TESTS:-1}" != 0 ]; then
  bash tests/vllm/run.sh
fi
