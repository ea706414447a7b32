"""A digest of the sources that make up an installed memdec_fast (Python, C++/CUDA, build files).

setup.py stores it beside the compiled extension, in memdec_fast/_build.json
(``build_info()["source_digest"]``), and tests/run.sh compares it with the checkout's, to reuse an installed build
that is this checkout's instead of compiling again. Standard library only: it
runs before torch is installed, as ``python source_digest.py ROOT``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys

_PATTERNS = ("setup.py", "build_backend.py", "source_digest.py", "pyproject.toml", "csrc/**/*", "memdec_fast/**/*")
_SKIP_SUFFIXES = (".so", ".pyd", ".pyc", "_build.json")  # _build.json: written by the build, holds the digest
COMPILED_PATTERNS = ("setup.py", "csrc/**/*")
"""What the compiled extension is made of: setup.py keys its cache of built extensions on these alone."""


def digest(root: str, patterns: tuple[str, ...] = _PATTERNS) -> str:
    """16 hex digits over the names and contents of the source files under `root` (the whole package's by
    default)."""
    files = set()
    for pattern in patterns:
        for f in glob.glob(os.path.join(root, pattern), recursive=True):
            if os.path.isfile(f) and "__pycache__" not in f and not f.endswith(_SKIP_SUFFIXES):
                files.add(os.path.relpath(f, root))
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.encode() + b"\0")
        with open(os.path.join(root, f), "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    print(digest(sys.argv[1] if len(sys.argv) > 1 else "."))
