#!/usr/bin/env bash
# Everything a lent GPU should verify, in one call (about 20 minutes on an H100):
#   bash benchmarks/gpu_check.sh [--tiny] [--out DIR]
# On a machine that already has torch and no network (the device image): builds the extension in place for the GPU
# present, runs every CUDA test, compute-sanitizer (memcheck, racecheck, synccheck) over the CUDA op tests, then
# bench_ops, bench_e2e, bench_serve and bench_llama (and, where vLLM is installed, tests/vllm and bench_vllm),
# writes every result as JSON into DIR (default
# benchmarks/results/gpu_check), and prints a table of each target, passed or missed (benchmarks/gpu_summary.py).
# --tiny: small sizes and smoke runs, so that the whole script also runs on a CPU (no sanitizer, CUDA tests skip).
# Set MEMDEC_FAST_COMMIT when the checkout has no .git (the device copies the working tree without it).
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
OUT=benchmarks/results/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MEMDEC_FAST_COMMIT=${MEMDEC_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
STEPS="$OUT/steps.tsv"
: > "$STEPS"

step() {  # step NAME COMMAND...: run, time, record the exit status; never stop the script
  local name=$1; shift
  local t0=$(date +%s)
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  tail -n 3 "$OUT/$name.log"
}

# 1. build in place, for the GPU present (setup.py picks its architecture)
step build "$PY" setup.py build_ext --inplace
# 2. every test file with CUDA tests (CUDA tests skip on a CPU)
CUDA_TESTS="tests/test_ops.py tests/test_decode_step.py tests/test_engine.py tests/test_generator.py"
[ -f tests/test_llama.py ] && CUDA_TESTS="$CUDA_TESTS tests/test_llama.py"
# shellcheck disable=SC2086
step tests "$PY" -m pytest -q -p no:cacheprovider $CUDA_TESTS --junitxml "$OUT/tests.xml"
# 3. compute-sanitizer over the CUDA op tests
if command -v compute-sanitizer > /dev/null && [ "$TINY" = 0 ]; then
  for tool in memcheck racecheck synccheck; do
    step "sanitizer_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k "cuda and not chi"
  done
fi
# 4. benchmarks
if [ "$TINY" = 1 ]; then
  step bench_ops "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py -k "B1-V50257 and compiled" \
    --benchmark-json "$OUT/ops.json"
  step bench_e2e "$PY" benchmarks/bench_e2e.py --tiny --out "$OUT/e2e.json"
  step bench_serve "$PY" benchmarks/bench_serve.py --quick --out "$OUT/serve.json"
else
  step bench_ops "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py --benchmark-json "$OUT/ops.json"
  step bench_e2e "$PY" benchmarks/bench_e2e.py --out "$OUT/e2e.json"
  step bench_serve "$PY" benchmarks/bench_serve.py --dtype bfloat16 --out "$OUT/serve.json"
  step bench_llama "$PY" benchmarks/bench_llama.py --device cuda --pair 1.5b+0.5b --batches 1 8 32 --new-tokens 64 \
    --out "$OUT/llama.json"
fi
# 4b. the sampler (issue 20 part 2): v2 (kernels/sample_split.cuh) is the default the steps above ran; v1
# (kernels/sample.cuh) runs the sample tests again, then each is timed in its own process (the variable is read once)
# and the two are compared side by side with the rows whose tokens differ (benchmarks/NOTES.md, "The sampler redesign")
step tests_sampler_v1 env MEMDEC_FAST_SAMPLER=v1 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k sample
SAMPLER_ARGS=""
[ "$TINY" = 1 ] && SAMPLER_ARGS="--tiny --reps 5"
for sampler in v1 v2; do
  # shellcheck disable=SC2086
  step "bench_sampler_$sampler" env MEMDEC_FAST_SAMPLER=$sampler "$PY" benchmarks/bench_sampler.py $SAMPLER_ARGS \
    --out "$OUT/sampler_$sampler.json"
done
step bench_sampler_compare "$PY" benchmarks/bench_sampler.py --compare "$OUT/sampler_v1.json" "$OUT/sampler_v2.json"
cat "$OUT/bench_sampler_compare.log"
# 5. the vLLM plugin, where vLLM is installed (the device image has none, and no network to fetch it)
if "$PY" -c "import vllm" 2> /dev/null; then
  step tests_vllm "$PY" -m pytest -q -p no:cacheprovider tests/vllm --junitxml "$OUT/tests_vllm.xml"
  if [ "$TINY" = 1 ]; then
    step bench_vllm "$PY" benchmarks/bench_vllm.py --pair tiny --requests 16 --concurrency 1 4 --out "$OUT/vllm.json"
  else
    step bench_vllm "$PY" benchmarks/bench_vllm.py --pair xl --out "$OUT/vllm.json"
  fi
else
  echo "== vllm: not installed in this environment; tests/vllm and bench_vllm did not run" | tee "$OUT/vllm.log"
fi
# 6. the summary: gpu_check.json beside the other results, and a table on stdout
"$PY" benchmarks/gpu_summary.py "$OUT"
