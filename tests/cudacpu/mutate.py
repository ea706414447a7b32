"""Mutation check of the CPU harness: inject known kernel bugs into copies of csrc/ and require that the harness
fails on each. It proves the harness can fail.

    python tests/cudacpu/mutate.py [--all-detectors] [--sanitizers-checked] [NAME ...]

For each mutation the detectors (the plain shim, TSan, ASan + UBSan) run over the cases marked `sanitize` in
test_cudacpu_kernels.py and test_cudacpu_sampler_v2.py (a mutation's `only` narrows them to its kernel's) until one fails, the one expected to catch it first; --all-detectors runs all three.
A control run on an unchanged copy comes first, under every detector (only the plain one with
--sanitizers-checked, which ci.sh passes after sanitize.sh): if it fails, a failure under a mutation means nothing. A mutation that
no detector catches, or that does not apply or compile, fails the script. Prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from cudacpu_harness import build_driver

DETECTORS = ("plain", "thread", "address")
V2 = "sample_v2 or split"  # the marked cases of the v2 sampler
TEST_FILES = ("test_cudacpu_kernels.py", "test_cudacpu_sampler_v2.py")


@dataclasses.dataclass
class Mutation:
    name: str
    file: str  # under csrc/
    old: str  # must occur exactly once
    new: str
    expect: str  # the detector that should catch it
    only: str = ""  # a pytest -k expression: the marked cases that run the mutated kernel (default all)


MUTATIONS = [
    Mutation("reduce result read in every thread", "kernels/block_row.cuh",
             "  const T out = total;", "  const T out = r;", "plain"),
    Mutation("missing barrier before a broadcast", "kernels/block_row.cuh",
             "  if (threadIdx.x == 0) total = r;\n  __syncthreads();", "  if (threadIdx.x == 0) total = r;",
             "thread"),
    Mutation("shfl_up swapped for shfl_down", "kernels/sample.cuh",
             "__shfl_up_sync(0xffffffffu, incl, o)", "__shfl_down_sync(0xffffffffu, incl, o)", "plain"),
    Mutation("conditional __syncthreads", "kernels/sample.cuh",
             "    __syncthreads();\n    const uint32_t pre = st.prefix", "    if (threadIdx.x < 256) __syncthreads();\n"
             "    const uint32_t pre = st.prefix", "plain"),
    Mutation("warp function called by 16 lanes", "kernels/sample.cuh",
             "if (threadIdx.x < 32) WarpFindCrossing", "if (threadIdx.x < 16) WarpFindCrossing", "plain"),
    Mutation("uninitialised prefix", "kernels/sample.cuh",
             "    st.prefix = st.mask = 0;", "    st.mask = 0;", "plain"),
    Mutation("non-atomic histogram", "kernels/sample.cuh",
             "atomicAdd(&bins[(key >> shift) & 255u], 1);", "bins[(key >> shift) & 255u] += 1;", "thread"),
    Mutation("j <= 256 on a shared array", "kernels/sample.cuh",
             "for (int j = threadIdx.x; j < 256; j += kThreads) bins[j] = 0;",
             "for (int j = threadIdx.x; j <= 256; j += kThreads) bins[j] = 0;", "address"),
    Mutation("i <= vocab on a global array", "kernels/mixture.cuh",
             "  for (int i = threadIdx.x; i < vocab; i += kThreads) {\n    o[i]",
             "  for (int i = threadIdx.x; i <= vocab; i += kThreads) {\n    o[i]", "address"),
    # the v2 sampler (kernels/sample_split.cuh)
    Mutation("v2: 64-bit bin carry dropped", "kernels/sample_split.cuh",
             "const unsigned carry = old + w_lo < old ? 1u : 0u;", "const unsigned carry = 0u;", "plain", V2),
    Mutation("v2: statistics of chunk 0 only", "kernels/sample_split.cuh",
             "  for (int g = 0; g < chunks; ++g) {\n    s.base = MaxSumMerge",
             "  for (int g = 0; g < 1; ++g) {\n    s.base = MaxSumMerge", "plain", V2),
    Mutation("v2: i <= hi in the scalar tail", "kernels/sample_split.cuh",
             "for (int i = tail + threadIdx.x; i < hi; i += kThreads)",
             "for (int i = tail + threadIdx.x; i <= hi; i += kThreads)", "address", V2),
    Mutation("v2: no barrier after zeroing bins", "kernels/sample_split.cuh",
             "low[j] = high[j] = 0;\n    __syncthreads();", "low[j] = high[j] = 0;", "thread", V2),
]

# The first line of a failure that says why, from the shim, a sanitizer or an assertion.
EVIDENCE = re.compile(r"(cudacpu: .*|WARNING: ThreadSanitizer: .*|ERROR: AddressSanitizer: [\w-]+|"
                      r".*runtime error: .*|AssertionError: .*|Mismatched elements.*|.*never wrote.*)")


def mutated_copy(m: Mutation | None, dest: Path) -> Path:
    """A copy of csrc/ under `dest`, with the mutation applied (none for the control)."""
    csrc = dest / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    if m is None:
        return csrc
    path = csrc / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutation '{m.name}': the pattern occurs {count} times in csrc/{m.file}; update mutate.py")
    path.write_text(text.replace(m.old, m.new))
    return csrc


def run_detector(detector: str, csrc: Path, cache: Path, only: str = "") -> tuple[bool, str, float]:
    """(caught, evidence, seconds) of the marked cases (those `only` selects) under one detector."""
    start = time.monotonic()
    sanitize = "" if detector == "plain" else detector
    try:
        build_driver(cache, sanitize, csrc)
    except RuntimeError as e:
        return False, f"BUILD FAILED: {str(e).splitlines()[-1]}", time.monotonic() - start
    env = {**os.environ, "CUDACPU_CSRC": str(csrc), "CUDACPU_SANITIZE": sanitize, "CUDACPU_CACHE": str(cache),
           "CUDACPU_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "pytest", *(str(HERE / f) for f in TEST_FILES), "-m", "sanitize", "-x", "-q",
           "-p", "no:cacheprovider", *(["-k", only] if only else [])]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    text = (proc.stdout + proc.stderr).replace(f"{csrc}/", "csrc/")
    return proc.returncode != 0, evidence_of(text), time.monotonic() - start


def evidence_of(text: str) -> str:
    """The first line that says why the run failed, and the first kernel source line named after it."""
    found = EVIDENCE.search(text)
    if not found:
        return text.strip().splitlines()[-1]
    why = re.sub(r"\(pid=\d+\)|^.*KernelFailed: \w+: ", "", found.group(0)).strip()
    where = re.search(r"csrc/kernels/\w+\.cuh:\d+", text[found.start():])
    if where and where.group(0) not in why:
        why = f"{why} at {where.group(0)}"
    return why[:110]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (substrings of their names); default all")
    parser.add_argument("--all-detectors", action="store_true", help="run every detector on every mutation")
    parser.add_argument("--sanitizers-checked", action="store_true",
                        help="the control runs the plain detector only (sanitize.sh has just passed)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or any(n in m.name for n in args.names)]
    rows, missed = [], []
    with tempfile.TemporaryDirectory(prefix="cudacpu-mutate-") as tmp:
        cache = Path(tmp) / "bin"
        control = mutated_copy(None, Path(tmp) / "control")
        for detector in DETECTORS[:1] if args.sanitizers_checked else DETECTORS:
            failed, evidence, seconds = run_detector(detector, control, cache)
            print(f"control: {detector}: {'FAILED' if failed else 'passed'} in {seconds:.0f} s", flush=True)
            if failed:
                print(f"mutate.py: the unchanged kernels fail under {detector}: {evidence}")
                return 1
        for i, m in enumerate(chosen):
            csrc = mutated_copy(m, Path(tmp) / str(i))
            caught_by = []
            for detector in sorted(DETECTORS, key=lambda d: d != m.expect):
                caught, evidence, seconds = run_detector(detector, csrc, cache, m.only)
                print(f"{m.name}: {detector}: {'caught' if caught else 'passed'} in {seconds:.0f} s: {evidence}",
                      flush=True)
                if caught:
                    caught_by.append((detector, evidence))
                    if not args.all_detectors:
                        break
            rows.append((m, caught_by))
            if not caught_by:
                missed.append(m.name)
    print(f"\n{'mutation':38} {'expected':9} {'caught by':24} evidence")
    for m, caught_by in rows:
        who = ", ".join(d for d, _ in caught_by) or "NOTHING"
        print(f"{m.name:38} {m.expect:9} {who:24} {caught_by[0][1] if caught_by else ''}")
    if missed:
        print(f"\nmutate.py: the harness missed {len(missed)} mutation(s): {', '.join(missed)}")
        return 1
    print(f"\nmutate.py: the harness caught all {len(rows)} mutations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
