"""Plain-PyTorch definitions of the fused ops: the definition of "right".

Every function here has the same signature and semantics as its twin in
:mod:`memdec_fast.ops`; the compiled kernels are tested against these. They
compute in float64 and favour clarity over speed.

The mixture, for each row::

    p_base = softmax(base_logits / base_temp)
    p_mem  = softmax(mem_logits / knn_temp)
    p      = (1 - lmbda) * p_base + lmbda * p_mem

Rows whose logits contain NaN or +inf, or are all -inf, in a model whose
mixture weight is non-zero, are *invalid*: their log-probabilities are NaN and
:func:`sample` returns token -1 for them.
"""

from __future__ import annotations

import math

import torch

from memdec_fast.params import Param, check_logits, check_params, check_targets

__all__ = ["component_logprobs", "joint_logprobs", "sample", "target_logprobs"]


def _column(x: Param, rows: int, device: torch.device) -> torch.Tensor:
    """A scalar or per-row parameter as a float64 column [rows, 1]."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64).reshape(rows, 1)
    return torch.full((rows, 1), float(x), dtype=torch.float64, device=device)


def _log_weight(w: torch.Tensor) -> torch.Tensor:
    """log(w) with log(0) = -inf, for mixture weights in [0, 1]."""
    return torch.where(w > 0, torch.log(w.clamp_min(1e-300)), torch.full_like(w, -math.inf))


def _masked_log_softmax(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log_softmax of a row that contributes with `weight`; NaN for invalid rows.

    A row is invalid when it holds NaN or +inf, or is all -inf. Rows with zero
    weight contribute nothing, so their validity does not matter: they give -inf.
    """
    # logits: [B, V] float64, weight: [B, 1]
    bad = torch.isnan(logits).any(-1, keepdim=True) | torch.isposinf(logits).any(-1, keepdim=True)
    bad |= torch.isneginf(logits).all(-1, keepdim=True)
    safe = torch.where(bad, torch.zeros_like(logits), logits)
    out = torch.log_softmax(safe, dim=-1)
    out = torch.where(bad, torch.full_like(out, math.nan), out)
    return torch.where(weight > 0, out, torch.full_like(out, -math.inf))


def component_logprobs(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    lmbda: Param,
    knn_temp: Param = 1.0,
    base_temp: Param = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p, log p_base and log p_mem as float64 [B, V] tensors.

    Unlike the public ops, log p_base and log p_mem are returned even where
    their weight is zero (then they are -inf in log p only through the weight).
    """
    rows = base_logits.shape[0]
    dev = base_logits.device
    lm = _column(lmbda, rows, dev)
    ones = torch.ones_like(lm)
    lp_base = _masked_log_softmax(base_logits.double() / _column(base_temp, rows, dev), ones)
    lp_mem = _masked_log_softmax(mem_logits.double() / _column(knn_temp, rows, dev), ones)
    joint = torch.logaddexp(
        torch.where(lm < 1, _log_weight(1 - lm) + lp_base, torch.full_like(lp_base, -math.inf)),
        torch.where(lm > 0, _log_weight(lm) + lp_mem, torch.full_like(lp_mem, -math.inf)),
    )
    bad = (torch.isnan(lp_base).any(-1, keepdim=True) & (lm < 1)) | (
        torch.isnan(lp_mem).any(-1, keepdim=True) & (lm > 0)
    )
    joint = torch.where(bad, torch.full_like(joint, math.nan), joint)
    return joint, lp_base, lp_mem


def joint_logprobs(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    lmbda: Param,
    knn_temp: Param = 1.0,
    base_temp: Param = 1.0,
) -> torch.Tensor:
    """log p of the mixture, float32 [B, V]. See :func:`memdec_fast.ops.joint_logprobs`."""
    check_logits(base_logits, mem_logits)
    check_params(base_logits.shape[0], lmbda=lmbda, knn_temp=knn_temp, base_temp=base_temp)
    return component_logprobs(base_logits, mem_logits, lmbda, knn_temp, base_temp)[0].float()


def target_logprobs(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    targets: torch.Tensor,
    lmbda: Param,
    knn_temp: Param = 1.0,
    base_temp: Param = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p, log p_base and log p_mem of `targets`, each float32 [N]."""
    check_logits(base_logits, mem_logits)
    check_targets(targets, base_logits)
    check_params(base_logits.shape[0], lmbda=lmbda, knn_temp=knn_temp, base_temp=base_temp)
    joint, lp_base, lp_mem = component_logprobs(base_logits, mem_logits, lmbda, knn_temp, base_temp)
    idx = targets.long().reshape(-1, 1)
    return tuple(t.gather(1, idx).squeeze(1).float() for t in (joint, lp_base, lp_mem))


def filtered_logits(
    logp: torch.Tensor,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
) -> torch.Tensor:
    """Hugging Face's warpers applied to `logp` [B, V] as logits, in HF's order.

    Temperature, then top-k (ties with the k-th value kept), then top-p (a token
    is kept when the mass of the tokens strictly more likely than it is below
    top_p, so ties at the boundary are kept and the best token always is), then
    min-p. Removed tokens are -inf. Rows with temperature 0 are left unscaled
    (greedy rows are decided by argmax, not by these logits).
    """
    rows, vocab = logp.shape
    dev = logp.device
    temp = _column(temperature, rows, dev)
    x = logp.double() / torch.where(temp > 0, temp, torch.ones_like(temp))
    neg_inf = torch.full_like(x, -math.inf)

    k = _column(top_k, rows, dev).long().clamp(0, vocab)
    kth = torch.sort(x, dim=-1, descending=True).values.gather(1, (k - 1).clamp_min(0))
    x = torch.where((k > 0) & (x < kth), neg_inf, x)

    p = _column(top_p, rows, dev)
    probs = torch.softmax(x, dim=-1)
    # mass of the tokens strictly more likely than each token
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    sorted_x = x.gather(1, order)
    incl = sorted_p.cumsum(-1)
    # first position of each run of equal values: ties share the mass above them
    first = torch.ones_like(sorted_x, dtype=torch.bool)
    first[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    pos = torch.arange(vocab, device=dev).expand(rows, vocab)
    run_start = torch.where(first, pos, torch.zeros_like(pos)).cummax(-1).values
    above = (incl - sorted_p).gather(1, run_start)
    remove_sorted = (above >= p) & (p < 1)
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    x = torch.where(remove, neg_inf, x)

    mp = _column(min_p, rows, dev)
    best = x.max(-1, keepdim=True).values
    x = torch.where((mp > 0) & (x < best + torch.log(mp.clamp_min(1e-300))), neg_inf, x)
    return x


def sample(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    lmbda: Param,
    knn_temp: Param = 1.0,
    base_temp: Param = 1.0,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from the mixture. See :func:`memdec_fast.ops.sample`.

    Returns (tokens int64 [B], logprobs float32 [B]), logprobs being log p of the
    chosen token under the unfiltered mixture. Invalid rows give token -1, NaN.
    """
    check_logits(base_logits, mem_logits)
    rows = base_logits.shape[0]
    check_params(
        rows, lmbda=lmbda, knn_temp=knn_temp, base_temp=base_temp, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p,
    )
    logp = component_logprobs(base_logits, mem_logits, lmbda, knn_temp, base_temp)[0]
    bad = torch.isnan(logp).any(-1)
    greedy = (_column(temperature, rows, logp.device) == 0).squeeze(1)
    x = filtered_logits(torch.where(bad[:, None], torch.zeros_like(logp), logp),
                        temperature, top_k, top_p, min_p)
    probs = torch.softmax(x, dim=-1)
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    tokens = torch.where(greedy, logp.argmax(-1), drawn)
    tokens = torch.where(bad, torch.full_like(tokens, -1), tokens)
    chosen = logp.gather(1, tokens.clamp_min(0)[:, None]).squeeze(1)
    chosen = torch.where(bad, torch.full_like(chosen, math.nan), chosen)
    return tokens, chosen.float()
