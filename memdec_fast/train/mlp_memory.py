"""MLP Memory: an MLP stack on the frozen base's hidden state, in upstream's checkpoint format.

The input is the base's hidden state entering its last block's MLP (after the
norm): exactly the datastore's keys. Checkpoint directory::

    config.json             a GPT2Config: n_layer, n_embd, n_inner, activation_function, vocab_size
    model.safetensors       embedding_transform.{weight,bias}  (only when the base's hidden size != n_embd)
                            h.{i}.ln_1.{weight,bias}
                            h.{i}.mlp.c_fc.{weight,bias}     Conv1D, weight [n_embd, n_inner]
                            h.{i}.mlp.c_proj.{weight,bias}   Conv1D, weight [n_inner, n_embd]
                            ln_f.{weight,bias}
                            lm_head.weight                   [vocab_size, n_embd]
    mlp_memory_config.json  {"layer_position": -1}

Each block computes ``x + c_proj(act(c_fc(ln_1(x))))``; then ``lm_head(ln_f(x))``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from memdec_fast import ranges
from memdec_fast.train.datastore import Datastore
from memdec_fast.train.files import check_output_dir, remove_own
from memdec_fast.train.loop import TrainConfig, train
from memdec_fast.train.loss import memory_loss
from memdec_fast.train.mixing import check_knn_temps, finish_memory
from memdec_fast.train.models import load_lm, load_tokenizer
from memdec_fast.train.targets import KnnTargets

__all__ = ["CHECKPOINT_FILES", "MLPMemory", "load_mlp_memory", "save_mlp_memory", "special_token_ids",
           "train_mlp_memory"]

CHECKPOINT_FILES = ("mlp_memory.pt", "mlp_memory.tmp")
"""What the trainer writes under its checkpoint directory, and all it removes from there when done."""


class _Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(inner, cfg.n_embd)
        self.mlp.c_proj = Conv1D(cfg.n_embd, inner)
        self.act = ACT2FN[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_1(x))))


class MLPMemory(nn.Module):
    """The MLP Memory network: hidden state [..., base_hidden] -> logits [..., vocab_size]."""

    def __init__(self, config: GPT2Config, base_hidden_size: int):
        super().__init__()
        self.config = config
        self.base_hidden_size = base_hidden_size
        if base_hidden_size != config.n_embd:
            self.embedding_transform = nn.Linear(base_hidden_size, config.n_embd)
        self.h = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for block in self.h:  # blocks start close to the identity
            nn.init.normal_(block.mlp.c_fc.weight, std=config.initializer_range)
            nn.init.normal_(block.mlp.c_proj.weight, std=config.initializer_range / (2 * config.n_layer) ** 0.5)
        nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.embedding_transform(hidden) if hasattr(self, "embedding_transform") else hidden
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def save_mlp_memory(memory: MLPMemory, out_dir: str | Path) -> Path:
    """Write `memory` in upstream's MLP Memory format (see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    memory.config.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in memory.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "mlp_memory_config.json").write_text(json.dumps({"layer_position": -1}, indent=1) + "\n")
    return out


def load_mlp_memory(path: str | Path) -> MLPMemory:
    """Read a checkpoint written by :func:`save_mlp_memory`."""
    path = Path(path)
    if not (path / "mlp_memory_config.json").is_file():
        raise ValueError(f"{path} is not an MLP Memory checkpoint (no mlp_memory_config.json)")
    config = GPT2Config.from_pretrained(path)
    state = load_file(path / "model.safetensors")
    base_hidden = state["embedding_transform.weight"].shape[1] if "embedding_transform.weight" in state \
        else config.n_embd
    memory = MLPMemory(config, base_hidden)
    memory.load_state_dict(state)
    return memory.eval()


def _key_batches(ds: Datastore, targets: KnnTargets, batch_size: int, seed: int, epoch: int,
                 skip: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Shuffled (keys [B, D] float32, values [B], knn_indices [B, W], knn_probs [B, W])."""
    order = np.random.default_rng([seed, epoch]).permutation(ds.keys.shape[0])
    for start in range(skip * batch_size, len(order), batch_size):
        rows = np.sort(order[start:start + batch_size])
        yield (torch.from_numpy(ds.keys[rows]).float(), torch.from_numpy(ds.values[rows]).long(),
               torch.from_numpy(targets.indices[rows]).long(), torch.from_numpy(targets.probs[rows]))


def train_mlp_memory(
    datastore: str | Path | Datastore,
    out_dir: str | Path,
    base: str | Path | None = None,
    n_layer: int = 4,
    n_embd: int | None = None,
    activation_function: str = "gelu_new",
    config: TrainConfig | None = None,
    work_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    tune_texts: list[str] | None = None,
    knn_temps: Sequence[float] = (1.0,),
    tuned_on: str | None = None,
) -> Path:
    """Train an MLP Memory on the datastore's keys with 0.5 * KL(p_kNN || p_mem) + 0.5 * CE.

    Parameters
    ----------
    datastore : path or Datastore
        With kNN targets built; its keys are the frozen base's hidden states.
    out_dir : path
        Receives the checkpoint (upstream format) and, with `base`, the tokenizer.
    base : path, optional
        The base's directory: initialises ln_f and lm_head from the base's when
        the sizes match, and provides the tokenizer.
    n_layer, n_embd, activation_function :
        The MLP stack (n_embd defaults to the base's hidden size).
    config : TrainConfig
        Optimisation settings; batch_size counts keys here.
    work_dir : path
        Checkpoint location (default ``<out_dir>/checkpoint``, whose checkpoint
        file is removed when done).
    overwrite : bool
        Write into an `out_dir` holding files the trainer does not write (they are
        kept); without it such a directory raises ValueError before training.
    tune_texts, knn_temps, tuned_on :
        As for :func:`~memdec_fast.train.decoder.train_memory_decoder`: the
        mixture weights written to ``memdec_config.json`` are tuned on
        `tune_texts` with `base` (default: the datastore's base), else the defaults.

    Returns
    -------
    Path
        ``out_dir``.

    Example
    -------
    >>> train_mlp_memory("ds/", "mlp_memory/", base="base/", n_layer=4)  # doctest: +SKIP
    """
    cfg = config or TrainConfig(batch_size=1024)
    ranges.check("mlp.n_layer", n_layer)
    if n_embd is not None:
        ranges.check("mlp.n_embd", n_embd)
    check_knn_temps(knn_temps)
    out = Path(out_dir)
    check_output_dir(out, CHECKPOINT_FILES, overwrite)
    ds = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
    targets = KnnTargets(ds.path / "knn_targets")
    dim, vocab = int(ds.meta["dim"]), int(ds.meta["vocab_size"])
    tokenizer = load_tokenizer(base) if base is not None else None
    gcfg = GPT2Config(vocab_size=vocab, n_embd=n_embd or dim, n_layer=n_layer,
                      activation_function=activation_function, n_positions=1, n_head=1,
                      **special_token_ids(tokenizer, vocab))
    torch.manual_seed(cfg.seed)
    memory = MLPMemory(gcfg, dim).to(device)
    if base is not None:
        lm = load_lm(base)
        head, ln_f = lm.get_output_embeddings(), getattr(getattr(lm, "transformer", None), "ln_f", None)
        if head.weight.shape == memory.lm_head.weight.shape:
            memory.lm_head.weight.data.copy_(head.weight.data)
        if ln_f is not None and ln_f.weight.shape == memory.ln_f.weight.shape:
            memory.ln_f.load_state_dict(ln_f.state_dict())

    def loss_fn(batch):
        keys, values, idx, probs = (t.to(device) for t in batch)
        loss, kl, ce = memory_loss(memory(keys), values, idx, probs, cfg.alpha)
        return loss, {"kl": kl, "ce": ce}

    ckpt = Path(work_dir) if work_dir is not None else out / "checkpoint"
    steps = -(-ds.keys.shape[0] // cfg.batch_size)
    train(memory, loss_fn, lambda e, s: _key_batches(ds, targets, cfg.batch_size, cfg.seed, e, s), steps, cfg,
          ckpt / CHECKPOINT_FILES[0], desc="mlp memory")
    save_mlp_memory(memory.cpu(), out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    finish_memory(out, ds, tune_texts, base, knn_temps, tuned_on, "mlp", device)
    if work_dir is None:
        remove_own(ckpt, CHECKPOINT_FILES)
    return out


def special_token_ids(tokenizer, vocab_size: int) -> dict[str, int | None]:
    """bos/eos/pad ids for a memory's config: the tokenizer's, None without one or when outside the vocabulary.

    GPT2Config's defaults (50256) are GPT-2's; in a config with another
    vocabulary they point outside it, and every load warns.
    """
    ids = {}
    for name in ("bos", "eos", "pad"):
        i = getattr(tokenizer, f"{name}_token_id", None) if tokenizer is not None else None
        ids[f"{name}_token_id"] = i if i is not None and 0 <= i < vocab_size else None
    return ids
