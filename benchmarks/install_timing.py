"""Time the README's first command on a fresh clone in a new virtual environment, and say where the time goes.

    python3 benchmarks/install_timing.py --label before --out benchmarks/results/install_timing.json

Each run: `git clone` of this checkout's HEAD into a temporary folder, `python3 -m venv` beside it, then the
install command (default `pip install -v .`, under `nice -n 10`) with every output line time-stamped, then
`memdec-fast demo`, and optionally more steps (`--then 'pip install -v ".[serve]"'`). Standard library only.

The breakdown comes from pip's own phase lines ("Installing build dependencies: started" ...), from ninja's log
(one entry per translation unit and the link) and from the build's progress lines. The load average is sampled
every 5 s. The run is appended to the JSON file's "runs" list under its label.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# pip's non-interactive spinner: "<what>: started" ... "<what>: finished with status 'done'"
PHASES = {
    "build_env_install": "Installing build dependencies",
    "build_env_backend_install": "Installing backend dependencies",  # what build_backend.py asks for: torch
    "get_requires": "Getting requirements to build wheel",
    "metadata": "Preparing metadata (pyproject.toml)",
    "build_wheel": "Building wheel for memdec_fast (pyproject.toml)",
}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class LoadSampler(threading.Thread):
    """The 1-minute load average every 5 s while a step runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(5.0):
            self.samples.append(loadavg()[0])

    def summary(self) -> dict:
        s = self.samples or [loadavg()[0]]
        return {"mean_1min": round(sum(s) / len(s), 2), "max_1min": max(s), "samples": len(s)}


def run_step(cmd: str, cwd: Path, env: dict, log: Path) -> tuple[float, int, list[tuple[float, str]]]:
    """Run `cmd` under nice, time-stamping each output line (seconds from the start)."""
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(["nice", "-n", "10", "bash", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            t = time.monotonic() - start
            lines.append((t, line.rstrip("\n")))
            fh.write(f"{t:8.1f} {line}")
        rc = proc.wait()
    return time.monotonic() - start, rc, lines


def pip_phases(lines: list[tuple[float, str]], seconds: float) -> dict:
    """Seconds spent in each of pip's phases, from its started/finished lines and its final install."""
    out: dict = {}
    for key, what in PHASES.items():
        t0 = next((t for t, s in lines if f"{what}: started" in s), None)
        t1 = next((t for t, s in lines if f"{what}: finished" in s), None)
        if t0 is not None and t1 is not None:
            out[key] = round(t1 - t0, 1)
    # each pip command's final install (a command line may run pip more than once)
    starts = [t for t, s in lines if s.startswith("Installing collected packages")]
    ends = [(t, len(s.split()) - 2) for t, s in lines if s.startswith("Successfully installed")]
    out["target_installs"] = [{"seconds": round(e - b, 1), "packages": n} for b, (e, n) in zip(starts, ends)]
    if ends:
        # after pip's last line: pip deleting its temporary folders (the isolated build environment), then exit
        out["after_last_install_s"] = round(seconds - ends[-1][0], 1)
    return out


def ninja_targets(clone: Path) -> list[dict]:
    """ninja's log of the extension's build: one entry per object and the link, in seconds."""
    found = []
    for path in glob.glob(str(clone / "build" / "**" / ".ninja_log"), recursive=True):
        seen = {}
        for row in Path(path).read_text().splitlines()[1:]:
            parts = row.split("\t")
            if len(parts) >= 4:
                seen[parts[3]] = (int(parts[0]) / 1000, int(parts[1]) / 1000)  # the last entry of a target wins
        for target, (t0, t1) in seen.items():
            found.append({"target": os.path.basename(target), "build": os.path.basename(os.path.dirname(path)),
                          "start_s": round(t0, 1), "end_s": round(t1, 1),
                          "seconds": round(t1 - t0, 1)})
    return sorted(found, key=lambda r: r["start_s"])


def silent_gaps(lines: list[tuple[float, str]], what: str) -> float:
    """The longest time without an output line inside pip's `what` phase (what a user watching the log sees)."""
    t0 = next((t for t, s in lines if f"{what}: started" in s), None)
    t1 = next((t for t, s in lines if f"{what}: finished" in s), None)
    if t0 is None or t1 is None:
        return 0.0
    ts = [t for t, _ in lines if t0 <= t <= t1]
    return round(max((b - a for a, b in itertools.pairwise(ts)), default=0.0), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "install_timing.json"))
    p.add_argument("--install", default="pip install -v .", help="the install command, run in the clone")
    p.add_argument("--then", action="append", default=[], help="a further command after the demo, timed too")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for every step")
    p.add_argument("--commit", default="HEAD", help="what to clone (a commit of this checkout)")
    p.add_argument("--keep", action="store_true", help="keep the clone and the venv")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="memdec_install_"))
    clone, venv = work / "clone", work / "venv"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", a.commit], cwd=clone, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    env.update(kv.split("=", 1) for kv in a.env)

    record: dict = {
        "label": a.label, "commit": commit, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "machine": {"cpus": os.cpu_count(), "gpu": "none visible"},
        "env": dict(kv.split("=", 1) for kv in a.env), "steps": [],
    }
    steps = [("install", a.install), ("demo", "memdec-fast demo"), *[(c, c) for c in a.then]]
    for i, (name, cmd) in enumerate(steps):
        sampler = LoadSampler()
        before = loadavg()
        sampler.start()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds, rc, lines = run_step(cmd, clone, env, work / f"step{i}.log")
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.stop.set()
        step = {"name": name, "command": cmd, "seconds": round(seconds, 1), "rc": rc,
                # CPU seconds of the step's processes: what a shared machine's load changes least
                "cpu_user_s": round(cpu1.ru_utime - cpu0.ru_utime, 1),
                "cpu_sys_s": round(cpu1.ru_stime - cpu0.ru_stime, 1), "loadavg_before": before,
                "loadavg_after": loadavg(), "load_during": sampler.summary(), "log": str(work / f"step{i}.log")}
        if "pip install" in cmd:
            step["pip_phases"] = pip_phases(lines, seconds)
            step["longest_silence_in_build_wheel_s"] = silent_gaps(lines, PHASES["build_wheel"])
            step["ninja"] = ninja_targets(clone)
            built = [s for _, s in lines if "extension built in" in s]
            step["build_lines"] = built[-1:]
        record["steps"].append(step)
        print(json.dumps({k: v for k, v in step.items() if k != "ninja"}), flush=True)
        for row in step.get("ninja", []):
            print(f"  {row['seconds']:7.1f} s  {row['target']} ({row['build']})", flush=True)
        if rc != 0:
            print(f"step {name} failed (rc {rc}); log: {step['log']}", file=sys.stderr)
            break
    record["total_install_and_demo_s"] = round(sum(s["seconds"] for s in record["steps"][:2]), 1)
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.exists() else {"what": __doc__.strip().splitlines()[0], "runs": []}
    data["runs"].append(record)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"total (install + demo): {record['total_install_and_demo_s']} s; written to {out}; work dir {work}")
    if not a.keep:
        subprocess.run(["rm", "-rf", str(venv)], check=False)
        subprocess.run(["rm", "-rf", str(clone / "build")], check=False)


if __name__ == "__main__":
    main()
