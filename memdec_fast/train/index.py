"""faiss indexes over datastore keys: exact for small datastores, IVFPQ for large ones.

Upstream builds IVFPQ with 4096 centroids and 64-byte codes, searched with
nprobe 32. :func:`ivfpq_plan` keeps those numbers for large datastores and scales
them down for smaller ones (faiss wants about 39 training points per centroid,
and the code size must divide the key dimension).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

__all__ = ["EXACT_MAX", "build_index", "ivfpq_plan", "load_index", "save_index", "search"]

EXACT_MAX = 200_000
"""Datastores with at most this many keys get an exact (flat L2) index."""


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("memdec_fast.train needs faiss: pip install faiss-cpu (or a GPU build)") from err
    return faiss


def ivfpq_plan(n_keys: int, dim: int) -> dict:
    """Centroids, code bytes and nprobe for an IVFPQ index over `n_keys` keys of size `dim`.

    Example
    -------
    >>> ivfpq_plan(100_000_000, 4096)
    {'nlist': 4096, 'code_bytes': 64, 'nbits': 8, 'nprobe': 32}
    """
    limit = min(4096.0, 4 * math.sqrt(n_keys), n_keys / 39)
    nlist = 2 ** int(math.log2(limit)) if limit >= 1 else 1
    code_bytes = max(b for b in range(1, min(64, dim) + 1) if dim % b == 0)
    nbits = min(8, max(1, int(math.log2(max(n_keys / 39, 2)))))
    return {"nlist": nlist, "code_bytes": code_bytes, "nbits": nbits, "nprobe": min(32, nlist)}


def _gpus() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _to_gpu(index):
    return _faiss().index_cpu_to_all_gpus(index) if _gpus() > 0 else index


def build_index(keys: np.ndarray, exact_max: int = EXACT_MAX, chunk: int = 65_536, seed: int = 0):
    """An index over `keys` [N, D] (any float dtype; added in float32 chunks).

    Flat L2 (exact) when N <= exact_max, else IVFPQ per :func:`ivfpq_plan`.
    Runs on the GPUs when faiss has any.
    """
    faiss = _faiss()
    n, dim = keys.shape
    if n <= exact_max:
        index = _to_gpu(faiss.IndexFlatL2(dim))
    else:
        plan = ivfpq_plan(n, dim)
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, plan["nlist"], plan["code_bytes"], plan["nbits"])
        sample = np.random.default_rng(seed).choice(n, size=min(n, max(256, plan["nlist"]) * 64), replace=False)
        index = _to_gpu(index)
        index.train(np.ascontiguousarray(keys[np.sort(sample)], dtype=np.float32))
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", plan["nprobe"])
    for start in tqdm(range(0, n, chunk), desc="index", unit="chunk"):
        index.add(np.ascontiguousarray(keys[start:start + chunk], dtype=np.float32))
    return index


def save_index(index, path: str | Path) -> None:
    """Write an index (moved to the CPU first when on a GPU)."""
    faiss = _faiss()
    faiss.write_index(faiss.index_gpu_to_cpu(index) if _gpus() > 0 else index, str(path))


def load_index(path: str | Path):
    """Read an index written by :func:`save_index`, onto the GPUs when faiss has any."""
    faiss = _faiss()
    index = faiss.read_index(str(path))
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(32, index.nlist)
    return _to_gpu(index)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared-L2 distances float32 [Q, k] and ids int64 [Q, k] (-1 where fewer were found)."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
