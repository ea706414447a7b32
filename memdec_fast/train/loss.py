"""The distillation loss shared by Memory Decoder and MLP Memory training."""

from __future__ import annotations

import torch

__all__ = ["memory_loss"]


def memory_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    knn_indices: torch.Tensor,
    knn_probs: torch.Tensor,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha * KL(p_kNN || p_mem) + (1 - alpha) * cross-entropy on the next token.

    Parameters
    ----------
    logits : Tensor [N, V]
        The memory's logits.
    targets : Tensor [N] int64
        Next tokens.
    knn_indices : Tensor [N, W] int64
    knn_probs : Tensor [N, W]
        Sparse p_kNN; zero-probability entries contribute nothing.
    alpha : float
        Weight of the KL term (upstream: 0.5).

    Returns
    -------
    (loss, kl, ce) : scalar tensors, means over the N rows.

    Example
    -------
    >>> loss, kl, ce = memory_loss(torch.zeros(1, 4), torch.tensor([2]), torch.tensor([[2]]), torch.tensor([[1.0]]))
    >>> round(float(kl), 4), round(float(ce), 4)
    (1.3863, 1.3863)
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    p = knn_probs.float()
    kl = (torch.xlogy(p, p) - p * logp.gather(1, knn_indices.long())).sum(-1).mean()
    ce = torch.nn.functional.nll_loss(logp, targets.long())
    return alpha * kl + (1 - alpha) * ce, kl, ce
