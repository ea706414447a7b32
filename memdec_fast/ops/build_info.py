"""What the compiled extension was built with."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memdec_fast import ops


def build_info() -> dict:
    """Describe the compiled extension.

    Returns
    -------
    dict
        ``compiled`` (bool), ``cpu`` and ``cuda`` (whether kernels for each were
        compiled), ``cuda_archs`` (list of "8.0"-style strings), ``cuda_version``
        (the toolkit's, or None), ``torch_built`` (the torch it was built
        against), ``torch_runtime``, ``source_digest`` (of the sources it was
        built from), ``cuda_choice`` (why the CUDA kernels were compiled or not)
        and, when it failed to load, ``error``.

    Example
    -------
    >>> import memdec_fast
    >>> memdec_fast.build_info()["compiled"]
    True
    """
    info = {"compiled": ops.compiled_available(), "torch_runtime": torch.__version__}
    if not info["compiled"]:
        info.update(cpu=False, cuda=False, cuda_archs=[], cuda_version=None, torch_built=None,
                    error=str(ops._LOAD_ERROR))
        return info
    info.update(json.loads(torch.ops.memdec_fast.build_info.default()))
    # written by the build beside the extension: the package's source digest, and why CUDA was compiled or not
    written = Path(ops._C.__file__).with_name("_build.json")
    if written.is_file():
        info.update(json.loads(written.read_text()))
    # what is registered, whatever the build said: a CUDA kernel for every op, or none
    info["cuda"] = bool(info.get("cuda")) and ops._CUDA_KERNELS
    return info
