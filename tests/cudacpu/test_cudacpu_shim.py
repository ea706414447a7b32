"""The shim itself (shim_selftest.cpp): collectives give CUDA's answers, and broken CUDA rules abort with the
place they were broken, in a child process."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from cudacpu_harness import HERE, SANITIZE, build_driver, compiler


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    if compiler() is None:
        pytest.skip("tests/cudacpu needs a C++ compiler (g++, or CXX): none found")
    cache = os.environ.get("CUDACPU_CACHE")
    out = Path(cache) if cache else tmp_path_factory.mktemp("cudacpu-selftest")
    return build_driver(out, SANITIZE, source=HERE / "shim_selftest.cpp")


def run(exe, mode: str, timeout: str = "120") -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), mode], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDACPU_TIMEOUT": timeout})


@pytest.mark.sanitize
def test_collectives(selftest):
    """Lane 1 of warp 1: shfl_up, shfl_down, shfl_xor 5, shfl from lane 7, ballot of odd lanes, inclusive scan of
    ones and its total; thread 0: BlockReduce of 0..127; an atomic histogram of 128 adds."""
    proc = run(selftest, "collectives")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "2", "4", "7", str(0xAAAAAAAA - 2**32), "34", "128", "8128", "128"]


@pytest.mark.sanitize
def test_shared_memory_is_poisoned_per_block(selftest):
    proc = run(selftest, "poison")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ffffffff", "7f7f7f7f", "a5a5a5a5"]


def test_reduce_result_only_in_thread_0(selftest):
    """CUB leaves BlockReduce's result undefined outside thread 0; the shim hands back the thread's own input."""
    proc = run(selftest, "reduce_thread5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1"]


@pytest.mark.parametrize("mode,message", [
    ("partial_mask", "warp intrinsic with mask 0x0000ffff"),
    # either order: the lane exits first, or its warp arrives first
    ("exited_lane", "lane 3 of warp 0 in block 0 exited while|after 1 of its lanes exited"),
    ("divergent_warp", "wait at different warp intrinsics"),
    ("barrier_after_exit", "__syncthreads reached by thread .* after .* exited|exited while .* wait at __syncthreads"),
])
def test_broken_rules_abort_with_the_place(selftest, mode, message):
    proc = run(selftest, mode)
    assert proc.returncode != 0
    assert "cudacpu: " in proc.stderr and re.search(message, proc.stderr), proc.stderr


def test_a_block_without_progress_times_out(selftest):
    proc = run(selftest, "spin", timeout="2")
    assert proc.returncode != 0
    assert "made no progress for 2 s" in proc.stderr, proc.stderr
