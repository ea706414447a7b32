"""Hugging Face's repetition penalty, applied to the mixture's log p.

HF divides a positive score by the penalty and multiplies a negative one. The
scores here are log p of the mixture, which are never positive, so a token
already in the row (prompt or generated) has its log p multiplied by the
penalty; the sampler's softmax renormalises. Reported log-probs stay those of
the unpenalised mixture.
"""

from __future__ import annotations

import torch

from memdec_fast.ops.params import Param


class RepetitionPenalty:
    """Tracks the tokens each row has seen, and samples from the penalised mixture.

    Parameters
    ----------
    rows : the prompts' token ids
    vocab : int, the mixture's size V
    penalty : float > 0 (1.0 is no penalty)
    device : where the logits live
    ops_module : memdec_fast.ops, or memdec_fast.reference
    """

    def __init__(self, rows: list[list[int]], vocab: int, penalty: float, device: torch.device, ops_module):
        self.penalty, self.ops = penalty, ops_module
        self.seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)  # [B, V]
        for i, r in enumerate(rows):
            self.seen[i, r] = True

    def __call__(self, base_logits: torch.Tensor, mem_logits: torch.Tensor, generator: torch.Generator | None = None,
                 **params: Param) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B], log p [B]) like ops.sample (same arguments), from the penalised mixture."""
        mix = {k: params[k] for k in ("lmbda", "knn_temp", "base_temp")}
        warp = {k: params[k] for k in ("temperature", "top_k", "top_p", "min_p")}
        logp = self.ops.joint_logprobs(base_logits, mem_logits, **mix)  # [B, V] float32
        scores = torch.where(self.seen, logp * self.penalty, logp)
        # the scores are the logits of the distribution to sample: lmbda 0 keeps them as they are
        tokens, _ = self.ops.sample(scores, scores, lmbda=0.0, **warp, generator=generator)
        picked = tokens.clamp_min(0)
        lp = logp.gather(1, picked[:, None])[:, 0].masked_fill(tokens < 0, float("nan"))
        self.seen[torch.arange(len(tokens), device=tokens.device), picked] = True
        return tokens, lp

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.seen = self.seen.index_select(0, rows)
