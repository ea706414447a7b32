"""Held-out scoring for the kNN-LM and for choosing mixture weights, under the project's PPL protocol.

Text is tokenized and windowed exactly as :func:`memdec_fast.eval.perplexity.perplexity`
does (lines with their newline, sliding windows of ``block_size`` with ``stride``),
so every number here is comparable with ``memdec-fast ppl``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from memdec_fast.eval.perplexity import plan_windows

__all__ = ["LMBDA_GRID", "as_lines", "best_lmbda", "mixture_ppl", "windowed_logprobs"]

LMBDA_GRID = [round(0.05 * i, 2) for i in range(1, 20)]
"""Mixture weights tried when one is chosen on validation text: 0.05, 0.10, ..., 0.95."""


def as_lines(texts: Iterable[str]) -> list[str]:
    """Documents as lines ending in a newline: how the project reads a text file."""
    return [t if t.endswith("\n") else t + "\n" for t in texts]


def mixture_ppl(lp_base: np.ndarray, lp_mem: np.ndarray, lmbda: float) -> float:
    """Perplexity of (1 - lmbda) * p_base + lmbda * p_mem from per-token log-probabilities [N]."""
    if lmbda == 0:
        return math.exp(-float(np.mean(lp_base)))
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log1p(-lmbda) + lp_base, np.log(lmbda) + lp_mem)
    return math.exp(-float(np.mean(mixed)))


def best_lmbda(lp_base: np.ndarray, lp_mem: np.ndarray, grid: Sequence[float] = LMBDA_GRID) -> float:
    """The weight of `grid` with the lowest mixture perplexity."""
    return min(grid, key=lambda lm: mixture_ppl(lp_base, lp_mem, lm))


def windowed_logprobs(score: Callable[[torch.Tensor], Sequence[torch.Tensor]], tokens: torch.Tensor,
                      block_size: int, stride: int) -> list[np.ndarray]:
    """Per-token log-probabilities over the sliding windows of :func:`memdec_fast.eval.perplexity.perplexity`.

    Parameters
    ----------
    score : callable
        ``score(ids [T])`` returns log-probabilities [T-1] of ids[1:], one tensor per model.
    tokens : Tensor [N] int64
    block_size, stride : int

    Returns
    -------
    list of float64 ndarrays [N-1], one per model, for tokens 1..N-1.
    """
    parts: list[list[np.ndarray]] = []
    for s in plan_windows(tokens.numel(), block_size, stride):
        lo, hi = s.first - s.begin, s.end - s.begin
        parts.append([lp[lo - 1:hi - 1].double().numpy() for lp in score(tokens[s.begin:s.end])])
    return [np.concatenate(p) for p in zip(*parts)]
