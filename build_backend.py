"""The build backend: setuptools', compiling against the torch already installed where pip installs, if any.

pip builds in an isolated environment, so by default the torch to compile against is installed twice: once
there (about 4 GB of wheels, unpacked and deleted again) and once to run. When the environment pip installs
into already has torch, that torch is the one the extension must match anyway, so the build uses it and pip
installs only setuptools, wheel and ninja. Otherwise (a new virtual environment), the pinned torch is
installed in the isolated environment as before. So:

    pip install torch && pip install .      # torch installed once
    pip install ".[serve]"                  # afterwards: no torch install, and the cached build is reused

MEMDEC_FAST_ISOLATED_TORCH=1 always installs the pinned torch in the isolated environment.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import build_sdist, build_wheel, prepare_metadata_for_build_wheel  # noqa: F401

TORCH = "torch==2.14.1"  # the release this project is developed on: its CUDA 13.0 build
BASE = ["setuptools>=64", "wheel", "ninja"]


def installed_torch_site() -> str | None:
    """site-packages of the environment running pip, when it holds torch. pip's isolation takes it off sys.path,
    but sysconfig still names it: the interpreter is that environment's."""
    if os.environ.get("MEMDEC_FAST_ISOLATED_TORCH", "0") not in ("", "0"):
        return None
    paths = sysconfig.get_paths()
    for key in ("purelib", "platlib"):
        if os.path.isfile(os.path.join(paths[key], "torch", "__init__.py")):
            return paths[key]
    return None


_SITE = installed_torch_site()
if _SITE is not None and _SITE not in sys.path:
    sys.path.append(_SITE)  # after the isolated environment: its setuptools and ninja come first


def _requires() -> list[str]:
    if _SITE is not None:
        print(f"memdec_fast: building against the torch installed in {_SITE}", file=sys.stderr)
        return list(BASE)
    return [*BASE, TORCH]


def get_requires_for_build_wheel(config_settings=None) -> list[str]:
    # not setuptools' own: that runs setup.py, which needs torch before it is installed
    return _requires()


def get_requires_for_build_sdist(config_settings=None) -> list[str]:
    return _requires()


def get_requires_for_build_editable(config_settings=None) -> list[str]:
    return _requires()


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
