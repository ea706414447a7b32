"""Memory Decoder training: a small causal LM distilled from the datastore's kNN targets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from memdec_fast.train.datastore import Datastore
from memdec_fast.train.files import check_output_dir, remove_own
from memdec_fast.train.loop import TrainConfig, train
from memdec_fast.train.loss import memory_loss
from memdec_fast.train.mixing import check_knn_temps, finish_memory
from memdec_fast.train.models import load_lm, load_tokenizer
from memdec_fast.train.targets import KnnTargets

__all__ = ["CHECKPOINT_FILES", "block_batches", "train_memory_decoder"]

CHECKPOINT_FILES = ("decoder.pt", "decoder.tmp")
"""What the trainer writes under its checkpoint directory, and all it removes from there when done."""


def block_batches(ds: Datastore, targets: KnnTargets, batch_size: int, seed: int, epoch: int,
                  skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled batches of blocks with their kNN targets, after the first `skip`.

    Yields (ids int64 [B, T], knn_indices int64 [B, T-1, W], knn_probs float32 [B, T-1, W]).
    """
    order = np.random.default_rng([seed, epoch]).permutation(ds.n_blocks)
    per = ds.block_size - 1
    for start in range(skip * batch_size, ds.n_blocks, batch_size):
        blocks = np.sort(order[start:start + batch_size])
        ids = np.stack([ds.block(b) for b in blocks])
        rows = (blocks[:, None] * per + np.arange(per)).reshape(-1)
        width = targets.indices.shape[1]
        yield (torch.from_numpy(ids).long(),
               torch.from_numpy(targets.indices[rows]).long().view(len(blocks), per, width),
               torch.from_numpy(targets.probs[rows]).view(len(blocks), per, width))


def train_memory_decoder(
    datastore: str | Path | Datastore,
    init: str | Path | PreTrainedModel,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    tokenizer_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    tune_texts: list[str] | None = None,
    base: str | Path | None = None,
    knn_temps: Sequence[float] = (1.0,),
    tuned_on: str | None = None,
) -> Path:
    """Train a Memory Decoder with 0.5 * KL(p_kNN || p_mem) + 0.5 * CE and save it as a HF directory.

    Parameters
    ----------
    datastore : path or Datastore
        With kNN targets built (:func:`build_knn_targets`).
    init : path or model
        The small causal LM to start from; it must share the base's tokenizer.
    out_dir : path
        Receives the trained model (save_pretrained) and the tokenizer.
    config : TrainConfig
        Optimisation settings (AdamW lr 1e-3, linear schedule, grad clip 1.0 by default).
    tokenizer_dir : path
        Where to copy the tokenizer from (default: `init` when it is a directory).
    work_dir : path
        Checkpoint location (default ``<out_dir>/checkpoint``, whose checkpoint file
        is removed when done); a run resumes from it.
    overwrite : bool
        Write into an `out_dir` holding files the trainer does not write (they are
        kept); without it such a directory raises ValueError before training.
    tune_texts : list[str], optional
        Validation documents: lmbda (and knn_temp among `knn_temps`) are chosen on
        them and written to ``memdec_config.json``; without them the file holds
        the defaults (lmbda 0.55, knn_temp 1.0).
    base : path, optional
        The base to tune with (default: the base recorded in the datastore).
    tuned_on : str, optional
        How to name the validation text in ``memdec_config.json``.

    Returns
    -------
    Path
        ``out_dir``.

    Example
    -------
    >>> train_memory_decoder("ds/", "base/", "memory/", TrainConfig(epochs=3))  # doctest: +SKIP
    """
    cfg = config or TrainConfig()
    check_knn_temps(knn_temps)
    out = Path(out_dir)
    check_output_dir(out, CHECKPOINT_FILES, overwrite)
    ds = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
    targets = KnnTargets(ds.path / "knn_targets")
    model = load_lm(init, device) if isinstance(init, (str, Path)) else init.to(device)
    if model.get_output_embeddings().weight.shape[0] != ds.meta["vocab_size"]:
        raise ValueError(f"the decoder's vocabulary ({model.get_output_embeddings().weight.shape[0]}) differs "
                         f"from the datastore's ({ds.meta['vocab_size']}): they must share a tokenizer")
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and ds.block_size > max_len:
        raise ValueError(f"the datastore's blocks ({ds.block_size} tokens) are longer than the decoder's context "
                         f"({max_len} positions)")
    tok_src = tokenizer_dir if tokenizer_dir is not None else init
    tokenizer = load_tokenizer(tok_src)
    torch.manual_seed(cfg.seed)

    def loss_fn(batch):
        ids, idx, probs = (t.to(device) for t in batch)
        logits = model(ids).logits[:, :-1]  # [B, T-1, V]
        loss, kl, ce = memory_loss(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   idx.reshape(-1, idx.shape[-1]), probs.reshape(-1, probs.shape[-1]), cfg.alpha)
        return loss, {"kl": kl, "ce": ce}

    ckpt = Path(work_dir) if work_dir is not None else out / "checkpoint"
    steps = -(-ds.n_blocks // cfg.batch_size)
    train(model, loss_fn, lambda e, s: block_batches(ds, targets, cfg.batch_size, cfg.seed, e, s), steps, cfg,
          ckpt / CHECKPOINT_FILES[0], desc="memory decoder")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    finish_memory(out, ds, tune_texts, base, knn_temps, tuned_on, "decoder", device)
    if work_dir is None:
        remove_own(ckpt, CHECKPOINT_FILES)
    return out

