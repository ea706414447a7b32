"""The kNN-LM baseline: retrieval from the datastore at every step, mixed like a memory.

At each position the base's hidden state entering its last MLP queries the
datastore's k nearest keys; their values vote with softmax(-d / temperature),
and the result is mixed with the base as p = (1 - lmbda) p_base + lmbda p_kNN.
It is the method Memory Decoder replaces: same knowledge, but a search per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memdec_fast import ops, ranges
from memdec_fast.train.datastore import Datastore, last_mlp_inputs
from memdec_fast.train.index import EXACT_MAX, build_index, load_index, save_index, search
from memdec_fast.train.models import Model, forward_cached, load_lm
from memdec_fast.train.targets import knn_distribution

__all__ = ["KNNLM"]


class KNNLM:
    """A base LM with a kNN datastore.

    Parameters
    ----------
    base : path or model
        The LM whose hidden states built the datastore.
    datastore : path or Datastore
    k : int
        Neighbours per query.
    temperature : float
        p_kNN = softmax(-d / temperature) over squared-L2 distances.
    lmbda : float
        Weight of p_kNN in the mixture.
    exact_max : int
        Datastores up to this size are searched exactly (IVFPQ beyond). An
        ``index.faiss`` already in the datastore is used as is.

    Example
    -------
    >>> knn = KNNLM("base/", "ds/", k=1024, lmbda=0.25)  # doctest: +SKIP
    >>> lp_base, lp_knn = knn.score(torch.tensor([5, 17, 42]))
    """

    def __init__(self, base: str | Path | Model, datastore: str | Path | Datastore, k: int = 1024,
                 temperature: float = 16.0, lmbda: float = 0.25, exact_max: int = EXACT_MAX):
        ranges.check("compare.k", k)
        ranges.check("compare.temperature", temperature)
        ranges.check("compare.knn_lmbda", lmbda, "lmbda")
        ranges.check("targets.exact_max", exact_max)
        self.model = load_lm(base) if isinstance(base, (str, Path)) else base.eval()
        self.ds = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
        self.k, self.temperature, self.lmbda = min(k, self.ds.keys.shape[0]), temperature, lmbda
        self.vocab_size = int(self.ds.meta["vocab_size"])
        self.values = torch.from_numpy(np.array(self.ds.values))
        index_file = self.ds.path / "index.faiss"
        if index_file.is_file():
            self.index = load_index(index_file)
        else:
            self.index = build_index(self.ds.keys, exact_max)
            save_index(self.index, index_file)

    def knn_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p_kNN float32 [Q, V] for queries hidden [Q, D] (-inf for tokens without a vote)."""
        d, ids = search(self.index, hidden.float().cpu().numpy(), self.k)
        p = knn_distribution(torch.from_numpy(d), torch.from_numpy(ids), self.values, self.vocab_size,
                             self.temperature)
        return p.log()

    @torch.inference_mode()
    def score(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_base and log p_kNN of the next tokens of ids [T] (one window), each float32 [T-1]."""
        with last_mlp_inputs(self.model) as captured:
            logits = self.model(ids[None]).logits[0, :-1]  # [T-1, V]
        lp_knn = self.knn_logprobs(captured[0][0, :-1])
        _, lp_base, lp_mem = ops.target_logprobs(logits.float(), lp_knn, ids[1:], lmbda=self.lmbda)
        return lp_base, lp_mem

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, past=None) -> tuple[torch.Tensor, object]:
        """One decoding step: log p of the mixture [B, V] after ids [B, t], and the new KV cache."""
        with last_mlp_inputs(self.model) as captured:
            out, cache = forward_cached(self.model, ids, past)
        lp_knn = self.knn_logprobs(captured[0][:, -1])
        return ops.joint_logprobs(out.logits[:, -1].float(), lp_knn, self.lmbda), cache
