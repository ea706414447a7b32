"""Fixtures of the CPU harness: the driver, compiled once per session (plain, or under CUDACPU_SANITIZE).

Not a conftest.py: the suite's test files import tests/conftest.py by the module name "conftest", which a second
conftest.py here would take over when the whole suite is collected. Test modules import these fixtures by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cudacpu_harness import SANITIZE, build_driver, compiler


@pytest.fixture(scope="session")
def driver(tmp_path_factory) -> Path:
    if compiler() is None:
        pytest.skip("tests/cudacpu needs a C++ compiler (g++, or CXX): none found")
    cache = os.environ.get("CUDACPU_CACHE")
    return build_driver(Path(cache) if cache else tmp_path_factory.mktemp("cudacpu"), SANITIZE)


@pytest.fixture
def work(tmp_path) -> Path:
    return tmp_path
