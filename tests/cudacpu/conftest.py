"""Fixtures of the CPU harness: the driver, compiled once per session (plain, or under CUDACPU_SANITIZE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cudacpu_harness import SANITIZE, build_driver, compiler


def pytest_configure(config):
    config.addinivalue_line("markers", "sanitize: the cases tests/cudacpu/sanitize.sh runs under TSan and ASan+UBSan")


@pytest.fixture(scope="session")
def driver(tmp_path_factory) -> Path:
    if compiler() is None:
        pytest.skip("tests/cudacpu needs a C++ compiler (g++, or CXX): none found")
    cache = os.environ.get("CUDACPU_CACHE")
    return build_driver(Path(cache) if cache else tmp_path_factory.mktemp("cudacpu"), SANITIZE)


@pytest.fixture
def work(tmp_path) -> Path:
    return tmp_path
