"""A digest of the sources that make up an installed memdec_fast (Python, C++/CUDA, build files).

setup.py stores it in the compiled extension (``build_info()["source_digest"]``),
and tests/run.sh compares it with the checkout's, to reuse an installed build
that is this checkout's instead of compiling again. Standard library only: it
runs before torch is installed, as ``python memdec_fast/source_digest.py ROOT``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys

_PATTERNS = ("setup.py", "pyproject.toml", "csrc/**/*", "memdec_fast/**/*")
_SKIP_SUFFIXES = (".so", ".pyd", ".pyc")


def digest(root: str) -> str:
    """16 hex digits over the names and contents of the package's source files under `root`."""
    files = set()
    for pattern in _PATTERNS:
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
