"""What the compiled extension was built with."""

from __future__ import annotations

import json

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
        against), ``torch_runtime`` and, when it failed to load, ``error``.

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
    return info
