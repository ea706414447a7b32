"""The datastore: keys (the base's hidden state entering its last MLP) and values (next tokens).

On disk, a datastore is a directory::

    meta.json     format, state ("allocating", "building" or "complete"), corpus_sha1, block_size,
                  base (name, class, weights_sha1), layer, n_tokens, n_blocks, n_keys, dim, vocab_size,
                  blocks_done
    tokens.npy    int32 [n_blocks * block_size]       the corpus, each document ending in a newline
    keys.npy      float16 [n_keys, dim]                memory-mapped
    values.npy    int32 [n_keys]

The corpus is cut into blocks of ``block_size`` tokens (the tail is dropped);
position i of block b (i < block_size - 1) is key row ``b * (block_size - 1) + i``
and its value is token i + 1 of the block. Memories train on the same blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from memdec_fast import ranges
from memdec_fast.models.checkpoint import read_json
from memdec_fast.models.runners import mlp_blocks
from memdec_fast.train.files import write_json_atomic
from memdec_fast.train.models import Model, load_lm, load_tokenizer

__all__ = ["FORMAT", "Datastore", "base_fingerprint", "build_datastore", "iter_documents", "last_mlp_inputs",
           "tokenize_corpus"]

FORMAT = 2
"""meta.json's format: 2 records the base, the layer and a completion state."""


@dataclass
class Datastore:
    """An opened datastore directory; arrays are read-only memory maps."""

    path: Path
    meta: dict
    tokens: np.ndarray  # int32 [n_blocks * block_size]
    keys: np.ndarray  # float16 [n_keys, dim]
    values: np.ndarray  # int32 [n_keys]

    @classmethod
    def open(cls, path: str | Path) -> Datastore:
        """Open a complete datastore written by :func:`build_datastore`; ValueError for anything else."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise ValueError(f"{path} is not a datastore (no meta.json); build one with build_datastore")
        meta = read_json(meta_file, recover=_REBUILD)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file} was written by an older memdec_fast and records neither the base nor a "
                             f"completion state; {_REBUILD}")
        if meta.get("state") != "complete":
            raise ValueError(f"datastore {path} is incomplete (state {meta.get('state')!r}, "
                             f"{meta.get('blocks_done')}/{meta.get('n_blocks')} blocks); rerun `memdec-fast train "
                             "datastore` with the same corpus and base to finish it, or with --overwrite")
        try:
            specs = _array_specs(meta)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{meta_file} is corrupt (bad or missing {err}); {_REBUILD}") from err
        arrays = []
        for name, (dtype, shape) in specs.items():
            try:
                a = np.load(path / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as err:
                raise ValueError(f"{path / name}.npy is missing or corrupt ({err}); {_REBUILD}") from err
            if a.dtype != dtype or a.shape != shape:
                raise ValueError(f"{path / name}.npy holds {a.dtype} {a.shape}, but {meta_file} says {np.dtype(dtype)} "
                                 f"{shape}; {_REBUILD}")
            arrays.append(a)
        return cls(path, meta, *arrays)

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    @property
    def n_blocks(self) -> int:
        return int(self.meta["n_blocks"])

    def block(self, b: int) -> np.ndarray:
        """Tokens of block b, int32 [block_size]."""
        return self.tokens[b * self.block_size:(b + 1) * self.block_size]


def _array_specs(meta: dict) -> dict[str, tuple[type, tuple[int, ...]]]:
    n_keys = int(meta["n_keys"])
    return {"tokens": (np.int32, (int(meta["n_blocks"]) * int(meta["block_size"]),)),
            "keys": (np.float16, (n_keys, int(meta["dim"]))), "values": (np.int32, (n_keys,))}


def iter_documents(corpus: str | Path | Iterable[str]) -> Iterator[str]:
    """Documents of a corpus: the non-empty lines of a text file, or the strings of an iterable."""
    if isinstance(corpus, (str, Path)):
        if not Path(corpus).is_file():
            raise ValueError(f"corpus file {corpus} does not exist")
        with open(corpus, encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
    else:
        yield from (doc for doc in corpus if doc.strip())


def tokenize_corpus(corpus: str | Path | Iterable[str], tokenizer, out: Path, chunk_docs: int = 2000) -> int:
    """Stream the corpus through the tokenizer into a raw int32 file; returns the token count.

    Each document is tokenized with a trailing newline and the results are
    concatenated with nothing between them: the way :func:`memdec_fast.perplexity`
    reads a text file, so that training and evaluation see the same token stream.
    """
    count = 0
    with open(out, "wb") as f:
        batch: list[str] = []
        for doc in [*iter_documents(corpus), None]:
            if doc is not None:
                batch.append(doc + "\n")
            if batch and (doc is None or len(batch) == chunk_docs):
                # verbose=False: documents longer than the base's context are fine here (the stream is cut into blocks),
                # so transformers' "Token indices sequence length is longer than ..." warning is noise
                for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                    np.asarray(ids, dtype=np.int32).tofile(f)
                    count += len(ids)
                batch = []
    return count


@contextlib.contextmanager
def last_mlp_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Capture the hidden state entering the last block's MLP (after its norm) on each forward.

    Yields a list that receives one tensor [B, T, D] per forward pass.
    """
    captured: list[torch.Tensor] = []
    handle = mlp_blocks(model)[-1].mlp.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


def base_fingerprint(model: Model, name: str) -> dict:
    """What a datastore's keys depend on in the base: its class and every weight, hashed.

    The hash covers the names, shapes, dtypes and bytes of the state dict as
    loaded (float32 from a directory), so a fine-tuned or re-exported copy of
    the same weights is recognised, and any change in a weight is not. It costs
    one pass over the weights: about a second per GB.
    """
    h = hashlib.sha1(type(model).__name__.encode())
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return {"name": name, "class": type(model).__name__, "weights_sha1": h.hexdigest()}


def _layer(model: Model) -> dict:
    n = len(mlp_blocks(model))
    return {"block": n - 1, "of": n, "point": "mlp_input"}


def build_datastore(
    base: str | Path | Model,
    corpus: str | Path | Iterable[str],
    out_dir: str | Path,
    tokenizer=None,
    block_size: int = 128,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    flush_every: int = 64,
    overwrite: bool = False,
) -> Datastore:
    """Run the base over a corpus and write keys and values to memory-mapped files.

    Resumable: when ``out_dir`` holds an unfinished datastore of the same corpus
    (same tokens, checked by hash), block size, base (same weights, checked by
    hash) and layer, the blocks already written are skipped; a finished one is
    returned as is. A datastore of anything else is replaced only with
    ``overwrite``; otherwise this raises ValueError naming what differs.

    Crash safety: meta.json is replaced atomically, says "allocating" before any
    array is touched, "building" (with the blocks done) once the arrays hold this
    corpus, and "complete" at the end; :meth:`Datastore.open` accepts only the last.

    Parameters
    ----------
    base : path or model
        A Hugging Face causal LM directory, or a loaded model (then pass ``tokenizer``).
    corpus : path or iterable of str
        A text file (one document per non-empty line) or the documents themselves.
    out_dir : path
        Where to write the datastore.
    block_size : int
        Tokens per block (at most the base's context length).
    batch_size : int
        Blocks per forward pass.
    flush_every : int
        Batches between flushes of the memory maps (and resume points).
    overwrite : bool
        Replace a datastore of another corpus, base, layer or block size (and its
        index and kNN targets), or one whose meta.json is unreadable.

    Returns
    -------
    Datastore

    Example
    -------
    >>> ds = build_datastore("base/", "corpus.txt", "ds/")  # doctest: +SKIP
    >>> ds.keys.shape
    (n_keys, hidden_size)
    """
    out = Path(out_dir)
    ranges.check("datastore.block_size", block_size)
    ranges.check("datastore.batch_size", batch_size)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    meta_file = out / "meta.json"
    old = None
    if meta_file.exists():
        try:
            old = read_json(meta_file, recover=_REBUILD)
        except ValueError:
            if not overwrite:
                raise
    model = load_lm(base, device) if isinstance(base, (str, Path)) else base.to(device).eval()
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and block_size > max_len:
        raise ValueError(f"--block-size {block_size} is longer than the base's context ({max_len} positions)")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base)
    name = str(Path(base).resolve()) if isinstance(base, (str, Path)) else \
        str(getattr(model, "name_or_path", "") or "<model>")
    ident = {"corpus_sha1": None, "block_size": block_size, "base": base_fingerprint(model, name),
             "layer": _layer(model)}
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "tokens.bin"
    try:
        n_tokens = tokenize_corpus(corpus, tokenizer, raw)
        ident["corpus_sha1"] = _sha1(raw)
        if old is not None and not overwrite:
            _check_same(meta_file, old, ident)
        meta = old if old is not None and not _differences(old, ident) else None
        if meta is not None and meta.get("state") == "complete":
            return Datastore.open(out)
        if meta is None or meta.get("state") != "building" or not _arrays_hold(out, meta, raw):
            meta = _allocate(out, model, raw, n_tokens, ident, device)
    finally:
        raw.unlink(missing_ok=True)

    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    keys = np.load(out / "keys.npy", mmap_mode="r+")
    values = np.load(out / "values.npy", mmap_mode="r+")
    n_blocks, per = meta["n_blocks"], block_size - 1
    starts = range(meta["blocks_done"], n_blocks, batch_size)
    with last_mlp_inputs(model) as captured, torch.inference_mode():
        for i, b0 in enumerate(tqdm(starts, desc="datastore", unit="batch")):
            b1 = min(b0 + batch_size, n_blocks)
            ids = torch.from_numpy(np.array(tokens[b0 * block_size:b1 * block_size])).long().view(b1 - b0, block_size)
            model(ids.to(device))
            hidden = captured.pop()[:, :-1]  # [B, T-1, D]
            keys[b0 * per:b1 * per] = hidden.reshape(-1, hidden.shape[-1]).to("cpu", torch.float16).numpy()
            values[b0 * per:b1 * per] = ids[:, 1:].reshape(-1).numpy()
            if (i + 1) % flush_every == 0 or b1 == n_blocks:
                keys.flush()  # msync: the keys reach the disk before meta.json counts them
                values.flush()
                meta["blocks_done"] = b1
                write_json_atomic(meta_file, meta)
    del keys, values
    meta["state"] = "complete"
    write_json_atomic(meta_file, meta)
    return Datastore.open(out)


_REBUILD = "rerun `memdec-fast train datastore` with --overwrite to rebuild it"
_DERIVED = ("index.faiss", "knn_targets")  # built from the keys: stale once they change


def _differences(meta: dict, ident: dict) -> list[str]:
    """What differs between a datastore's meta and the wanted identity, in words (empty when it is the same)."""
    if meta.get("format") != FORMAT:
        return ["format (written by an older memdec_fast, which recorded no base)"]
    words = {"corpus_sha1": "corpus", "block_size": "block size", "layer": "layer"}
    diff = [w for k, w in words.items() if meta.get(k) != ident[k]]
    old_base = meta.get("base") if isinstance(meta.get("base"), dict) else {}
    if {k: old_base.get(k) for k in ("class", "weights_sha1")} != {k: ident["base"][k] for k in ("class", "weights_sha1")}:
        diff.append(f"base ({old_base.get('name')} then, {ident['base']['name']} now)")
    return diff


def _check_same(meta_file: Path, meta: dict, ident: dict) -> None:
    diff = _differences(meta, ident)
    if diff:
        state = "complete" if meta.get("state") == "complete" else "unfinished"
        raise ValueError(f"{meta_file.parent} already holds a {state} datastore of another {', '.join(diff)}; "
                         "rerun with --overwrite to replace it (keys, values, index and kNN targets), "
                         "or choose another --out")


def _arrays_hold(out: Path, meta: dict, raw: Path) -> bool:
    """Whether the arrays on disk have meta's shapes and tokens.npy holds the freshly tokenized corpus."""
    try:
        specs = _array_specs(meta)
        if not 0 <= int(meta["blocks_done"]) <= int(meta["n_blocks"]):
            return False
        arrays = {n: np.load(out / f"{n}.npy", mmap_mode="r") for n in specs}
    except (OSError, KeyError, TypeError, ValueError):
        return False
    if any(arrays[n].dtype != dt or arrays[n].shape != shape for n, (dt, shape) in specs.items()):
        return False
    have, n = arrays["tokens"], arrays["tokens"].shape[0]
    if raw.stat().st_size < 4 * n:
        return False
    want = np.memmap(raw, dtype=np.int32, mode="r", shape=(n,))
    step = 1 << 24
    return all(np.array_equal(have[i:i + step], want[i:i + step]) for i in range(0, n, step))


def _allocate(out: Path, model: Model, raw: Path, n_tokens: int, ident: dict, device) -> dict:
    """Start over: meta.json says "allocating" before the arrays are re-created, "building" once they are."""
    block_size = ident["block_size"]
    n_blocks = n_tokens // block_size
    if n_blocks == 0:
        raise ValueError(f"the corpus has {n_tokens} tokens, fewer than one block of {block_size}")
    first = np.fromfile(raw, dtype=np.int32, count=block_size)
    n_keys = n_blocks * (block_size - 1)
    meta = {"format": FORMAT, "state": "allocating", **ident, "n_tokens": n_tokens, "n_blocks": n_blocks,
            "n_keys": n_keys, "dim": _hidden_size(model, first, device), "vocab_size": _vocab_size(model),
            "blocks_done": 0}
    write_json_atomic(out / "meta.json", meta)
    for name in _DERIVED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    tokens = open_memmap(out / "tokens.npy", "w+", np.int32, (n_blocks * block_size,))
    tokens[:] = np.fromfile(raw, dtype=np.int32, count=n_blocks * block_size)
    tokens.flush()
    open_memmap(out / "keys.npy", "w+", np.float16, (n_keys, meta["dim"])).flush()
    open_memmap(out / "values.npy", "w+", np.int32, (n_keys,)).flush()
    del tokens
    meta["state"] = "building"
    write_json_atomic(out / "meta.json", meta)
    return meta


def _sha1(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _hidden_size(model: Model, block: np.ndarray, device) -> int:
    with last_mlp_inputs(model) as captured, torch.inference_mode():
        model(torch.from_numpy(np.array(block[:2])).long()[None].to(device))
    return int(captured[0].shape[-1])


def _vocab_size(model: Model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
