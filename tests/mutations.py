"""Bugs injected on purpose, one at a time, each into a copy of the package: the tests must catch every one.

    python tests/mutations.py [NAME ...]

memdec_fast (with its compiled extension memdec_fast/_C*.so, when built), tests/ and pyproject.toml are copied
to a temporary directory; each mutation changes one thing in its own copy, and the tests meant to catch it run
there (the copy is what ``import memdec_fast`` finds), once with the extension and once with
MEMDEC_FAST_DISABLE_EXTENSION=1. A control run of all those tests on the unchanged copy comes first: if it
fails, a failure under a mutation means nothing.

The first five are issue 24's table; the others guard the tests added with it. Exit status 0 when the control
passes and every mutation is caught in both setups; 1 otherwise, or when a mutation no longer applies (the code
it changes has moved: update its text here). Run it from anywhere; it finds the checkout from its own path.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    path: str  # relative to the checkout
    edits: list[tuple[str, str]]  # alternatives (old, new): the first whose old text occurs exactly once applies
    tests: list[str]  # test files
    select: str  # pytest -k expression


MUTATIONS = [
    Mutation("top_p_drops_its_boundary_token", "memdec_fast/ops/reference.py",
             [("above = (incl - sorted_p).gather(1, run_start)", "above = incl.gather(1, run_start)")],
             ["tests/test_ops.py"], "hf_warpers or exact_distribution"),
    Mutation("stop_hold_back_off_by_one", "memdec_fast/generation/outputs.py",
             [("for k in range(1, len(s)) if", "for k in range(1, len(s) - 1) if"),
              ("tail = text[max(0, len(text) - len(stop) + 1) :]", "tail = text[max(0, len(text) - len(stop) + 2) :]")],
             ["tests/test_generator.py", "tests/test_engine.py"], "holds_back"),
    Mutation("length_checked_before_stop_ids", "memdec_fast/generation/outputs.py",
             [("""        if self.finish_reason is None and token in ending.stop_ids:
            self.finish_reason = "eos" if token == ending.eos_id else "stop"
        if self.finish_reason is None and len(self.token_ids) == ending.max_new_tokens:
            self.finish_reason = "length"
""", """        if self.finish_reason is None and len(self.token_ids) == ending.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None and token in ending.stop_ids:
            self.finish_reason = "eos" if token == ending.eos_id else "stop"
""")],
             ["tests/test_engine.py", "tests/test_server.py", "tests/test_generator.py"], "last_token"),
    Mutation("default_knn_temp_0.8", "memdec_fast/models/checkpoint.py",
             [('DEFAULT_MIXING = {"lmbda": 0.55, "knn_temp": 1.0}', 'DEFAULT_MIXING = {"lmbda": 0.55, "knn_temp": 0.8}')],
             ["tests/test_ppl.py", "tests/test_engine.py"], "defaults or reads_mixing"),
    # the tests added with issue 24, retargeted to the one decode step (issue 21)
    Mutation("capture_without_rng_reset", "memdec_fast/engine/step.py",
             [("""            main.wait_stream(self.stream)
            self.rng.set_state(rng_state)
            graph = torch.cuda.CUDAGraph()
""", """            main.wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
""")],
             ["tests/test_engine.py", "tests/test_decode_step.py"], "fake"),
    Mutation("failed_capture_leaves_the_capture_stream_current", "memdec_fast/engine/step.py",
             [("""            torch.cuda.set_stream(main)  # torch.cuda.graph leaves its stream current when capture_end raises
""", "")],
             ["tests/test_engine.py", "tests/test_decode_step.py"], "fake"),
    Mutation("stop_id_row_keeps_no_text", "memdec_fast/generation/outputs.py",
             [("        if self.finish_reason is not None and not ending.track_text:",
               "        if self.finish_reason == \"length\" and not ending.track_text:")],
             ["tests/test_generator.py"], "stop_ids or last_token"),
]

SETUPS = {"extension": {}, "no extension": {"MEMDEC_FAST_DISABLE_EXTENSION": "1"}}


def copy_checkout(dest: Path) -> None:
    """memdec_fast (its compiled extension included), tests/ and pyproject.toml of the checkout, into dest."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "memdec_fast", dest / "memdec_fast", ignore=skip)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=skip)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def mutate(copy: Path, m: Mutation) -> str | None:
    """Apply m in `copy`; None when done, else why it could not be."""
    path = copy / m.path
    text = path.read_text()
    for old, new in m.edits:
        if text.count(old) == 1:
            path.write_text(text.replace(old, new))
            return None
    return f"does not apply: none of its {len(m.edits)} texts occurs once in {m.path}"


def run_tests(copy: Path, tests: list[str], select: str, env_extra: dict[str, str]) -> tuple[int, str]:
    """(pytest's exit status, a one-line summary) of the tests, run in `copy` so that its package is imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEMDEC_FAST_DISABLE_EXTENSION", "PYTHONPATH")}
    env.update(env_extra, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    probe = "import memdec_fast; print(memdec_fast.__file__); print(memdec_fast.build_info()['compiled'])"
    check = subprocess.run([sys.executable, "-c", probe], check=False, cwd=copy, env=env, capture_output=True,
                           text=True)
    lines = check.stdout.split()
    if check.returncode != 0 or not lines or not lines[0].startswith(str(copy)):
        return 99, f"imports another memdec_fast: {check.stdout.strip()} {check.stderr.strip()[-300:]}"
    if lines[1] != str("MEMDEC_FAST_DISABLE_EXTENSION" not in env_extra):
        return 99, f"compiled extension {'missing' if lines[1] == 'False' else 'loaded'} in this setup"
    proc = subprocess.run([sys.executable, "-m", "pytest", *tests, "-k", select, "-x", "-q", "-p", "no:cacheprovider",
                           "-rf"], check=False, cwd=copy, env=env, capture_output=True, text=True)
    out = proc.stdout.splitlines()
    failed = next((re.sub(r"^FAILED ", "", line).split(" - ")[0] for line in out if line.startswith("FAILED ")), "")
    summary = next((line.strip("= ") for line in reversed(out) if re.search(r"\d+ (passed|failed|error|deselected)", line)),
                   (proc.stdout + proc.stderr).strip()[-300:])
    return proc.returncode, f"{summary}{'; first: ' + failed if failed else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"mutations to run (default: all): {', '.join(m.name for m in MUTATIONS)}")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if not list((ROOT / "memdec_fast").glob("_C*.so")):
        print("mutations: memdec_fast/_C*.so is not built in this checkout; the 'extension' runs will report it")
    ok = True
    with tempfile.TemporaryDirectory(prefix="memdec_mutations_") as tmp:
        base = Path(tmp) / "control"
        copy_checkout(base)
        files = sorted({t for m in chosen for t in m.tests})
        select = " or ".join(f"({m.select})" for m in chosen)
        for setup, env_extra in SETUPS.items():
            t0 = time.monotonic()
            status, summary = run_tests(base, files, select, env_extra)
            print(f"control ({setup}): {'passed' if status == 0 else 'FAILED'}: {summary} [{time.monotonic() - t0:.0f} s]",
                  flush=True)
            ok &= status == 0
        for m in chosen:
            copy = Path(tmp) / m.name
            shutil.copytree(base, copy)
            why = mutate(copy, m)
            if why is not None:
                print(f"{m.name} ({m.path}): {why}", flush=True)
                ok = False
                continue
            for setup, env_extra in SETUPS.items():
                t0 = time.monotonic()
                status, summary = run_tests(copy, m.tests, m.select, env_extra)
                verdict = "caught" if status == 1 else "SURVIVED" if status == 0 else f"ERROR (pytest exit {status})"
                print(f"{m.name} ({m.path}), {setup}: {verdict}: {summary} [{time.monotonic() - t0:.0f} s]", flush=True)
                ok &= status == 1
            shutil.rmtree(copy)
    print("all caught" if ok else "NOT all caught (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
