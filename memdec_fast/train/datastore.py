"""The datastore: keys (the base's hidden state entering its last MLP) and values (next tokens).

On disk, a datastore is a directory::

    meta.json     block_size, n_blocks, n_keys, dim, vocab_size, corpus_sha1, blocks_done
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
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from memdec_fast.train.models import Model, load_lm, load_tokenizer

__all__ = ["Datastore", "build_datastore", "iter_documents", "last_mlp_inputs", "tokenize_corpus"]


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
        """Open a complete datastore written by :func:`build_datastore`."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise ValueError(f"{path} is not a datastore (no meta.json); build one with build_datastore")
        meta = json.loads(meta_file.read_text())
        if meta["blocks_done"] < meta["n_blocks"]:
            raise ValueError(f"datastore {path} is incomplete ({meta['blocks_done']}/{meta['n_blocks']} blocks)")
        return cls(path, meta, *(np.load(path / f"{n}.npy", mmap_mode="r") for n in ("tokens", "keys", "values")))

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    @property
    def n_blocks(self) -> int:
        return int(self.meta["n_blocks"])

    def block(self, b: int) -> np.ndarray:
        """Tokens of block b, int32 [block_size]."""
        return self.tokens[b * self.block_size:(b + 1) * self.block_size]


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
                for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    np.asarray(ids, dtype=np.int32).tofile(f)
                    count += len(ids)
                batch = []
    return count


@contextlib.contextmanager
def last_mlp_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Capture the hidden state entering the last block's MLP (after its norm) on each forward.

    Yields a list that receives one tensor [B, T, D] per forward pass.
    """
    layers = None
    for attr in ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers"):
        with contextlib.suppress(AttributeError):
            layers = _getattr_path(model, attr)
            break
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    captured: list[torch.Tensor] = []
    handle = layers[-1].mlp.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def build_datastore(
    base: str | Path | Model,
    corpus: str | Path | Iterable[str],
    out_dir: str | Path,
    tokenizer=None,
    block_size: int = 128,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    flush_every: int = 64,
) -> Datastore:
    """Run the base over a corpus and write keys and values to memory-mapped files.

    Resumable: when ``out_dir`` holds a datastore of the same corpus (same tokens,
    checked by hash) and block size, the blocks already written are skipped.

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
    out.mkdir(parents=True, exist_ok=True)
    model = load_lm(base, device) if isinstance(base, (str, Path)) else base.to(device).eval()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base)
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    meta_file = out / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    raw = out / "tokens.bin"
    n_tokens = tokenize_corpus(corpus, tokenizer, raw)
    digest = _sha1(raw)
    if meta.get("block_size") != block_size or meta.get("corpus_sha1") != digest:
        n_blocks = n_tokens // block_size
        if n_blocks == 0:
            raise ValueError(f"the corpus has {n_tokens} tokens, fewer than one block of {block_size}")
        tokens = open_memmap(out / "tokens.npy", "w+", np.int32, (n_blocks * block_size,))
        tokens[:] = np.fromfile(raw, dtype=np.int32, count=n_blocks * block_size)
        tokens.flush()
        dim = _hidden_size(model, tokens[:block_size], device)
        n_keys = n_blocks * (block_size - 1)
        open_memmap(out / "keys.npy", "w+", np.float16, (n_keys, dim)).flush()
        open_memmap(out / "values.npy", "w+", np.int32, (n_keys,)).flush()
        meta = {"block_size": block_size, "n_blocks": n_blocks, "n_keys": n_keys, "dim": dim,
                "vocab_size": _vocab_size(model), "corpus_sha1": digest, "blocks_done": 0}
        meta_file.write_text(json.dumps(meta, indent=1))
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
                keys.flush()
                values.flush()
                meta["blocks_done"] = b1
                meta_file.write_text(json.dumps(meta, indent=1))
    return Datastore.open(out)


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
