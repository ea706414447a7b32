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

from memdec_fast.ops.params import Param, check_logits, check_params, check_targets

__all__ = ["component_logprobs", "joint_logprobs", "mixture_vjp", "sample", "target_logprobs"]


def _column(x: Param, rows: int, device: torch.device) -> torch.Tensor:
    """A scalar or per-row parameter as a float64 column [rows, 1]."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64).reshape(rows, 1)
    return torch.full((rows, 1), float(x), dtype=torch.float64, device=device)


def _log_weight(w: torch.Tensor) -> torch.Tensor:
    """log(w) with log(0) = -inf, for mixture weights in [0, 1]."""
    return torch.where(w > 0, torch.log(w.clamp_min(1e-300)), torch.full_like(w, -math.inf))


def _masked_log_softmax(logits: torch.Tensor, temp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits / temp) of a row that contributes with `weight`; NaN for invalid rows.

    Computed as (logits - max) / temp, which is finite for every temp > 0 where
    logits / temp may overflow. A row is invalid when it holds NaN or +inf, or
    is all -inf. Rows with zero weight contribute nothing, so their validity
    does not matter: they give -inf.
    """
    # logits: [B, V] float64, temp and weight: [B, 1]
    bad = torch.isnan(logits).any(-1, keepdim=True) | torch.isposinf(logits).any(-1, keepdim=True)
    bad |= torch.isneginf(logits).all(-1, keepdim=True)
    safe = torch.where(bad, torch.zeros_like(logits), logits)
    # the shift cancels in log_softmax, so it is a constant for autograd
    out = torch.log_softmax((safe - safe.detach().amax(-1, keepdim=True)) / temp, dim=-1)
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
    lp_base = _masked_log_softmax(base_logits.double(), _column(base_temp, rows, dev), ones)
    lp_mem = _masked_log_softmax(mem_logits.double(), _column(knn_temp, rows, dev), ones)
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
    min-p. Removed tokens are -inf. Each row is shifted so that its max is 0,
    which no filter or softmax notices. Rows with temperature 0 are left
    unscaled (greedy rows are decided by argmax, not by these logits).
    """
    rows, vocab = logp.shape
    dev = logp.device
    temp = _column(temperature, rows, dev)
    # (logp - max) / temperature: finite for every temperature > 0, where logp / temperature may overflow
    x = logp.double()
    x = (x - x.amax(-1, keepdim=True)) / torch.where(temp > 0, temp, torch.ones_like(temp))
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
    return tokens, chosen.float().detach()  # sampling is not differentiable, as in the compiled op


def mixture_vjp(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    lmbda: Param,
    knn_temp: Param,
    base_temp: Param,
    grad_joint: torch.Tensor,
    grad_base: torch.Tensor | None = None,
    grad_mem: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of log p, log p_base and log p_mem [B, V] (:func:`component_logprobs`), in closed form.

    With upstream gradients g, g_b and g_m of the three, the models' shares of
    each token w_b = (1 - lmbda) p_base / p and w_m = lmbda p_mem / p, and the
    scaled logits s_b = (b - max b) / base_temp::

        u_b = g * w_b + g_b
        d base_logits = (u_b - p_base * sum(u_b)) / base_temp
        d base_temp   = -sum((u_b - p_base * sum(u_b)) * s_b) / base_temp
        d lmbda       = sum(g * (p_mem - p_base) / p)

    and likewise for the memory with knn_temp. The compiled ops' backward.
    Computed in float32 (float64 for float64 logits), from the logits as the
    kernels scale them.

    Returns
    -------
    (d base_logits, d mem_logits) : in the logits' dtypes, [B, V] each
    (d lmbda, d knn_temp, d base_temp) : [B] each
    """
    ct = torch.float64 if base_logits.dtype == torch.float64 else torch.float32
    rows, dev = base_logits.shape[0], base_logits.device
    lm, tm, tb = (_column(v, rows, dev).to(ct) for v in (lmbda, knn_temp, base_temp))

    def scaled(x: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        x = x.to(ct)
        return (0.5 * x - 0.5 * x.amax(-1, keepdim=True)) / temp * 2  # halves: x - max may overflow

    sb, sm = scaled(base_logits, tb), scaled(mem_logits, tm)  # [B, V]
    lpb, lpm = sb.log_softmax(-1), sm.log_softmax(-1)
    log_wb = torch.where(lm < 1, torch.log1p(-lm) + lpb, -math.inf)  # log (1 - lmbda) p_base
    log_wm = torch.where(lm > 0, torch.log(lm) + lpm, -math.inf)
    logp = torch.logaddexp(log_wb, log_wm)
    never = logp == -math.inf  # p = 0: no share, no gradient
    g = grad_joint.to(ct)

    def through_softmax(s, lp, u, temp):
        total = u.sum(-1, keepdim=True)
        gs = u - torch.where(total != 0, torch.exp(lp) * total, 0.0)  # an unused, invalid model stays 0
        d_temp = -torch.where(s > -math.inf, gs * s, 0.0).sum(-1) / temp.squeeze(1)
        return gs / temp, d_temp

    u_b = g * torch.where(never, 0.0, torch.exp(log_wb - logp))
    u_m = g * torch.where(never, 0.0, torch.exp(log_wm - logp))
    if grad_base is not None:
        u_b = u_b + grad_base.to(ct)
    if grad_mem is not None:
        u_m = u_m + grad_mem.to(ct)
    d_base, d_base_temp = through_softmax(sb, lpb, u_b, tb)
    d_mem, d_knn_temp = through_softmax(sm, lpm, u_m, tm)
    d_lmbda = (g * torch.where(never, 0.0, torch.exp(lpm - logp) - torch.exp(lpb - logp))).sum(-1)
    return d_base.to(base_logits.dtype), d_mem.to(mem_logits.dtype), d_lmbda, d_knn_temp, d_base_temp
