"""What the sample kernel must pick: Philox4x32-10 in Python, and the inverse-CDF pick over the set that
memdec_fast.reference.filtered_logits keeps, in float64."""

from __future__ import annotations

import itertools
import math

import torch

from memdec_fast import reference

M32 = 0xFFFFFFFF


def philox4x32(counter: tuple[int, int, int, int], key: int) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al. 2011) of a 128-bit counter and a 64-bit key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key & M32, (key >> 32) & M32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def row_uniform(seed: int, offset: int, row: int) -> float:
    """The kernel's uniform in [0, 1) for `row`: 24 bits of the Philox block at counter (offset / 4, row).

    `offset` is torch's, in 32-bit numbers; the kernel counts 128-bit blocks, as curand_init does.
    """
    block = offset // 4
    x0 = philox4x32((block & M32, block >> 32, row & M32, row >> 32), seed)[0]
    return (x0 >> 8) / 16777216.0


def _pick(logp: torch.Tensor, temperature: float, top_k: float, top_p: float, min_p: float, u: float) -> int:
    """The first token, in index order, whose running weight over the filtered set exceeds u * total."""
    x = reference.filtered_logits(logp.double()[None], temperature, int(top_k), min(top_p, 1.0), min_p)[0]
    w = torch.softmax(x, -1)
    cum = torch.cumsum(w, -1)
    i = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])], dtype=torch.float64), right=True)[0])
    if i >= logp.numel() or w[i] == 0:  # rounding left the total short of the target: the last kept token
        i = int(torch.nonzero(w > 0)[-1])
    return i


def exact_pick(logp: torch.Tensor, params: dict[str, float], u: float) -> int:
    """The pick over the float64 reference log p [V] with the row's warper parameters and uniform u."""
    return _pick(logp, *(params[n] for n in ("temperature", "top_k", "top_p", "min_p")), u)


def rounding_picks(logps: list[torch.Tensor], params: dict[str, float], u: float, slack: float = 1e-5) -> set[int]:
    """The picks that float32 rounding can explain.

    The kernel works in float32, so a draw within `slack` of a boundary of the CDF, or a top-p / min-p cut within
    `slack` of a token, may go either way: these are the picks under those perturbations, for each log p in
    `logps` (the float64 reference's, and the kernel's own float32 one from the joint kernel).
    """
    t, k, p, mp = (params[n] for n in ("temperature", "top_k", "top_p", "min_p"))
    picks = set()
    for logp, du, dp, dm in itertools.product(logps, (0, -slack, slack), (0, -slack, slack), (0, -slack, slack)):
        uu = min(max(u + du, 0.0), math.nextafter(1.0, 0.0))
        picks.add(_pick(logp, t, k, p * (1 + dp) if p < 1 else p, mp * (1 + dm), uu))
    return picks
