#!/usr/bin/env bash
# The CPU harness's cases marked `sanitize` (every kernel, both samplers, v2's row split over blocks, every filter,
# special values, strided rows; the shim's collectives) under ThreadSanitizer, then under AddressSanitizer + UndefinedBehaviorSanitizer with exact-size
# buffers. A few minutes on 2 cores.
#   bash tests/cudacpu/sanitize.sh [pytest args]
# CUDACPU_CSRC compiles another csrc/ (mutate.py's copies); CUDACPU_CACHE keeps the compiled drivers.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
export CUDACPU_CACHE=${CUDACPU_CACHE:-$(mktemp -d)}
for sanitizer in thread address; do
  start=$SECONDS
  echo "tests/cudacpu/sanitize.sh: $sanitizer"
  CUDACPU_SANITIZE=$sanitizer "$PYTHON" -m pytest tests/cudacpu -m sanitize -q -p no:cacheprovider "$@"
  echo "tests/cudacpu/sanitize.sh: $sanitizer passed in $((SECONDS - start)) s"
done
