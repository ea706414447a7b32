"""Argument checks shared by the compiled ops and their references.

Each check raises ValueError naming the offending argument, so both paths
report bad input in the same words.
"""

from __future__ import annotations

import math

import torch

from memdec_fast import ranges

Param = float | int | torch.Tensor
"""A sampling parameter: one Python number for the batch, or a tensor [B]."""

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

FLOAT32_MAX = ranges.FLOAT32_MAX
"""The largest temperature: the kernels apply temperatures in float32."""

# name -> (lowest, highest, lowest allowed?, highest allowed?), from the one table the command line also reads
_RANGES = {
    name: (r.low, r.high, not (r.low_open or math.isinf(r.low)), not (r.high_open or math.isinf(r.high)))
    for name, r in ranges.SAMPLING.items()
}


def _describe(name: str) -> str:
    lo, hi, lo_in, hi_in = _RANGES[name]
    return f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def _in_range(name: str, x: torch.Tensor | float) -> bool:
    lo, hi, lo_in, hi_in = _RANGES[name]
    if isinstance(x, torch.Tensor):
        x = x.double()
        ok = (x >= lo if lo_in else x > lo) & (x <= hi if hi_in else x < hi)
        return bool(ok.all())
    return (x >= lo if lo_in else x > lo) and (x <= hi if hi_in else x < hi)


def check_params(rows: int, **params: Param) -> None:
    """Check scalar or per-row sampling parameters against their valid ranges.

    A tensor parameter must have shape [rows]; top_k must be integral. Checking
    a CUDA tensor's values synchronises with the device once.
    """
    for name, value in params.items():
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.shape[0] != rows:
                raise ValueError(f"{name}: expected a number or a tensor of shape [{rows}], got shape {list(value.shape)}")
            if name == "top_k" and (value.is_floating_point() or value.is_complex()):
                raise ValueError(f"{name}: expected an integer tensor, got {value.dtype}")
            if value.is_meta:
                raise ValueError(f"{name}: a meta tensor has no values to check")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number or a tensor, got {type(value).__name__}")  # noqa: TRY004
        elif name == "top_k" and not isinstance(value, int):
            raise ValueError(f"{name}: expected an int, got {value!r}")
        if not _in_range(name, value):
            shown = value if not isinstance(value, torch.Tensor) else "a value"
            raise ValueError(f"{name}: {shown} is outside {_describe(name)}")


def check_logits(base_logits: torch.Tensor, mem_logits: torch.Tensor) -> None:
    """Check that the two logit tensors are [B, V] twins on one device."""
    for name, t in (("base_logits", base_logits), ("mem_logits", mem_logits)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")  # noqa: TRY004
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [B, V], got shape {list(t.shape)}")
        if t.dtype not in LOGIT_DTYPES:
            raise ValueError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
        if t.shape[1] < 2:
            raise ValueError(f"{name}: the vocabulary must have at least 2 entries, got {t.shape[1]}")
    if base_logits.shape != mem_logits.shape:
        raise ValueError(
            f"mem_logits: shape {list(mem_logits.shape)} does not match base_logits {list(base_logits.shape)}"
        )
    check_devices(base_logits, mem_logits=mem_logits)


def check_devices(base_logits: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Check that every given tensor is on the device of `base_logits` (None is skipped).

    With mixed devices the dispatcher runs one device's kernel, the Meta one
    included (which only allocates), for all of them: this catches it first.
    """
    for name, t in tensors.items():
        if t is not None and t.device != base_logits.device:
            where = "base_logits is" if name == "mem_logits" else "the logits are"
            raise ValueError(f"{name}: on {t.device}, but {where} on {base_logits.device}")


def check_targets(targets: torch.Tensor, base_logits: torch.Tensor) -> None:
    """Check target token ids [N] against logits [N, V]; reads the values once."""
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError("targets: expected an int64 or int32 tensor")
    if targets.shape != base_logits.shape[:1]:
        raise ValueError(f"targets: expected shape [{base_logits.shape[0]}], got {list(targets.shape)}")
    check_devices(base_logits, targets=targets)
    if targets.numel() and not targets.is_meta and bool(((targets < 0) | (targets >= base_logits.shape[1])).any()):
        raise ValueError(f"targets: ids must lie in [0, {base_logits.shape[1]})")
