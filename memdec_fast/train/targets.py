"""kNN target distributions: what the memories are distilled from.

For each key, the k nearest other keys (itself dropped) vote for their values
with weights softmax(-d / temperature), d being squared-L2 distances. The
distribution over the vocabulary is stored sparse: its ``width`` most likely
tokens and their probabilities, renormalised to sum to 1 (exact whenever fewer
than ``width`` distinct tokens got a vote).

On disk, in ``<datastore>/knn_targets/``::

    meta.json     k, temperature, width, rows_done
    indices.npy   int32 [n_keys, width]    token ids (0 where the probability is 0)
    probs.npy     float32 [n_keys, width]  sorted descending
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from memdec_fast import ranges
from memdec_fast.models.checkpoint import read_json
from memdec_fast.train.datastore import Datastore
from memdec_fast.train.files import write_json_atomic
from memdec_fast.train.index import EXACT_MAX, build_index, save_index, search

__all__ = ["KnnTargets", "build_knn_targets", "drop_self", "knn_distribution"]

_REBUILD = "rerun `memdec-fast train targets` to rebuild them"


def knn_distribution(dists: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, vocab_size: int,
                     temperature: float = 16.0) -> torch.Tensor:
    """p_kNN over the vocabulary from neighbour distances and ids.

    Parameters
    ----------
    dists : Tensor [Q, k]
        Squared-L2 distances.
    ids : Tensor [Q, k] int64
        Neighbour rows; -1 marks a missing neighbour (it gets no weight).
    values : Tensor [N] int
        The datastore's values (next tokens).
    vocab_size : int
    temperature : float

    Returns
    -------
    Tensor [Q, vocab_size] float32, rows summing to 1.

    Example
    -------
    >>> knn_distribution(torch.tensor([[0.0, 16.0]]), torch.tensor([[0, 1]]), torch.tensor([2, 3]), 4)
    tensor([[0.0000, 0.0000, 0.7311, 0.2689]])
    """
    valid = ids >= 0
    logits = torch.where(valid, -dists.float() / temperature, torch.full_like(dists, -torch.inf, dtype=torch.float32))
    weights = torch.softmax(logits, dim=-1)  # [Q, k]
    tokens = values.long()[ids.clamp_min(0)]  # [Q, k]
    return torch.zeros(ids.shape[0], vocab_size).scatter_add_(1, tokens, weights)


def drop_self(dists: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its k + 1 neighbours (or, when absent, the farthest one).

    Parameters
    ----------
    dists, ids : ndarray [Q, k + 1]
    rows : ndarray [Q]  the queries' own rows in the datastore

    Returns
    -------
    (dists, ids) : ndarrays [Q, k]
    """
    is_self = ids == rows[:, None]
    first = is_self.cumsum(1) == 1
    drop = is_self & first
    drop[~drop.any(1), -1] = True
    keep = ~drop
    q, k1 = ids.shape
    return dists[keep].reshape(q, k1 - 1), ids[keep].reshape(q, k1 - 1)


class KnnTargets:
    """Opened sparse kNN targets: ``indices`` and ``probs`` memory maps [n_keys, width]."""

    def __init__(self, path: str | Path):
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise ValueError(f"{path} has no kNN targets; run build_knn_targets first")
        self.meta = read_json(meta_file, recover=_REBUILD)
        if "n_keys" not in self.meta or self.meta.get("rows_done", 0) < self.meta["n_keys"]:
            raise ValueError(f"kNN targets in {path} are incomplete ({self.meta.get('rows_done')}/"
                             f"{self.meta.get('n_keys')} rows); {_REBUILD}")
        self.indices = np.load(path / "indices.npy", mmap_mode="r")
        self.probs = np.load(path / "probs.npy", mmap_mode="r")


def build_knn_targets(
    datastore: str | Path | Datastore,
    k: int = 1024,
    temperature: float = 16.0,
    width: int = 64,
    exact_max: int = EXACT_MAX,
    chunk: int = 1024,
    flush_every: int = 32,
) -> KnnTargets:
    """Compute sparse p_kNN for every key of a datastore (resumable).

    Also saves the index as ``<datastore>/index.faiss`` for the kNN-LM baseline.

    Parameters
    ----------
    datastore : path or Datastore
    k : int
        Neighbours per key (itself excluded); capped at n_keys - 1.
    temperature : float
        p_kNN = softmax(-d / temperature).
    width : int
        Tokens kept per row.
    exact_max : int
        Largest datastore searched exactly; larger ones use IVFPQ.
    chunk : int
        Queries per search.

    Returns
    -------
    KnnTargets

    Example
    -------
    >>> t = build_knn_targets("ds/", k=1024)  # doctest: +SKIP
    >>> t.probs.sum(1)  # ones
    """
    for name, value in (("k", k), ("temperature", temperature), ("width", width), ("exact_max", exact_max)):
        ranges.check(f"targets.{name}", value)
    ds = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
    n = ds.keys.shape[0]
    if n < 2:
        raise ValueError("a datastore needs at least 2 keys for kNN targets")
    k = min(k, n - 1)
    vocab = int(ds.meta["vocab_size"])
    width = min(width, vocab)
    out = ds.path / "knn_targets"
    out.mkdir(exist_ok=True)
    meta_file = out / "meta.json"
    want = {"k": k, "temperature": temperature, "width": width, "n_keys": n}
    try:
        meta = read_json(meta_file, recover=_REBUILD) if meta_file.is_file() else {}
    except ValueError:
        meta = {}  # derived data: a corrupt meta.json only costs a rebuild
    if {key: meta.get(key) for key in want} != want:
        meta = {**want, "rows_done": 0}
        write_json_atomic(meta_file, meta)  # rows_done 0 before the arrays are re-created
        open_memmap(out / "indices.npy", "w+", np.int32, (n, width)).flush()
        open_memmap(out / "probs.npy", "w+", np.float32, (n, width)).flush()
    if meta["rows_done"] < n:
        index = build_index(ds.keys, exact_max)
        save_index(index, ds.path / "index.faiss")
        indices = np.load(out / "indices.npy", mmap_mode="r+")
        probs = np.load(out / "probs.npy", mmap_mode="r+")
        values = torch.from_numpy(np.array(ds.values))
        starts = range(meta["rows_done"], n, chunk)
        for i, r0 in enumerate(tqdm(starts, desc="knn targets", unit="chunk")):
            rows = np.arange(r0, min(r0 + chunk, n))
            d, ids = drop_self(*search(index, ds.keys[rows], k + 1), rows)
            p = knn_distribution(torch.from_numpy(d), torch.from_numpy(ids), values, vocab, temperature)
            top = p.topk(width, dim=-1)  # values/indices [Q, width]
            kept = top.values / top.values.sum(-1, keepdim=True)
            probs[rows] = kept.numpy()
            indices[rows] = torch.where(kept > 0, top.indices, 0).int().numpy()
            if (i + 1) % flush_every == 0 or rows[-1] == n - 1:
                indices.flush()
                probs.flush()
                meta["rows_done"] = int(rows[-1]) + 1
                write_json_atomic(meta_file, meta)
    return KnnTargets(out)
