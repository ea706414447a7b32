"""Where a measurement came from: the git commit and the machine's load, for every results JSON."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD of the checkout; MEMDEC_FAST_COMMIT when set (a copied tree without .git, as on a lent GPU)."""
    if os.environ.get("MEMDEC_FAST_COMMIT"):
        return os.environ["MEMDEC_FAST_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def uptime() -> str:
    """`uptime`'s line: the machine's load while the benchmark ran (a shared machine is rarely idle)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
