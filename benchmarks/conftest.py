"""Shared settings for the pytest-benchmark files in benchmarks/.

Run, e.g.: pytest benchmarks/bench_ops.py --benchmark-json benchmarks/results/ops_cpu.json
Each JSON names the device, the torch version, the date and the git commit.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
from provenance import git_commit, uptime

# Inductor's background compile workers would otherwise still be busy when the
# next case is timed; compile in-process instead.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


_LOAD_AT_START = uptime()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["memdec_fast"] = {
        "uptime_at_start": _LOAD_AT_START,
        "uptime_at_end": uptime(),
        "devices": {d: device_name(d) for d in DEVICES},
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


@pytest.fixture
def timed(benchmark):
    """benchmark.pedantic with a warm-up, synchronising CUDA around each call."""

    def run(fn, *args, device: str = "cpu", rounds: int = 10, **kwargs):
        def call():
            out = fn(*args, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        for _ in range(2):
            call()
        return benchmark.pedantic(call, rounds=rounds, iterations=1)

    return run
