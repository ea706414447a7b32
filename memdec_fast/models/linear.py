"""The lean models' linear layers: oneDNN's GEMM on the CPU, torch's own elsewhere.

On the CPU, torch's ``F.linear`` in float32 runs MKL's sgemm, which streams weights at about half the memory
bandwidth at one row and computes at about half of oneDNN's rate at 4-32 rows (benchmarks/NOTES.md, "Engine
speed"). oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the op torch's own CPU compiler
emits) takes the same dense weights, so nothing is re-laid-out or stored twice, and it can apply the tanh GELU
in the same pass. It has no backward: a call that needs gradients takes ``F.linear``.

``MEMDEC_FAST_CPU_LINEAR=torch`` (read once, at import) keeps ``F.linear`` everywhere, e.g. to compare the two.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_CHOICES = ("onednn", "torch")


def _onednn_usable() -> bool:
    choice = os.environ.get("MEMDEC_FAST_CPU_LINEAR", "onednn")
    if choice not in _CHOICES:
        raise ValueError(f"MEMDEC_FAST_CPU_LINEAR: expected one of {_CHOICES}, got {choice!r}")
    if choice == "torch":
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        logger.info("memdec_fast: this torch has no oneDNN linear; CPU linear layers use F.linear")
        return False
    return True


ONEDNN = _onednn_usable()
"""True when CPU linear layers in float32 and bfloat16 run oneDNN's inner product."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu_tanh: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then the tanh GELU when `gelu_tanh`.

    x: [..., K]; weight: [N, K]; bias: [N] or None -> [..., N]. On the CPU in float32 or bfloat16, without
    gradients, one oneDNN call (the GELU fused into it).
    """
    fast = (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))
    if fast:
        if gelu_tanh:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if gelu_tanh else y


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear`: the same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
