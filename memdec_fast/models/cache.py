"""The static KV cache shared by the lean models (GPT-2, the Llama family).

Two kinds of cache: a model's own, one per attention module (:class:`KVCache`, written at a shared
slot index for a left-padded batch), and a caller's, such as the engine's slots (:class:`SlotCache`,
each row written at its own positions by :func:`write_rows`). Both are only written in place, so that a
CUDA graph may hold their addresses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def keep_positions(x: torch.Tensor, hidden: torch.Tensor | None, last: torch.Tensor | None, tail: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The positions whose logits are wanted: each row's `last` [B] (x -> [B, 1, D]), the last `tail`, or all."""
    if last is not None:
        pick = torch.arange(x.shape[0], device=x.device), last
        return x[pick][:, None], None if hidden is None else hidden[pick][:, None]
    if tail is not None:
        return x[:, -tail:], None if hidden is None else hidden[:, -tail:]
    return x, hidden


class KVCache(nn.Module):
    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        # k, v: [B, H, S, Dh]; a CUDA graph may hold their addresses, so they are only written in place
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: [T] cache slots; k, v: [B, H, T, Dh]
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class SlotCache(NamedTuple):
    """One block's caller-owned cache, as a batch sees it (e.g. an engine's slots).

    k, v: [N, H, S, Dh], N cache rows of S slots; rows: the batch's rows, a slice (the reads are
    views) or a LongTensor [B] (the reads gather); length: attention reads slots [0, length).
    """

    k: torch.Tensor
    v: torch.Tensor
    rows: slice | torch.Tensor
    length: int


def write_rows(cache: SlotCache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each row's keys and values at that row's own cache slots, then read its slots [0, length).

    slots: [B, T]; k, v: [B, H, T, Dh] -> (k, v) [B, H, length, Dh]. No data-dependent control flow,
    so that a decode step can be captured in a CUDA graph.
    """
    if isinstance(cache.rows, slice):
        ck, cv = cache.k[cache.rows], cache.v[cache.rows]  # views, written through
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1], broadcast against slots [B, T]
    else:
        ck, cv, rows = cache.k, cache.v, cache.rows[:, None]
    ck[rows, :, slots] = k.transpose(1, 2)  # indexed as [B, T, H, Dh]
    cv[rows, :, slots] = v.transpose(1, 2)
    if isinstance(cache.rows, slice):
        return ck[:, :, : cache.length], cv[:, :, : cache.length]
    return cache.k[cache.rows, :, : cache.length], cache.v[cache.rows, :, : cache.length]


class CachedDecoder(nn.Module):
    """A decoder whose blocks each have an ``attn`` holding a :class:`KVCache`; subclasses name their blocks
    (:meth:`attention_blocks`) and the shape of one block's cache (:meth:`kv_shape`)."""

    def attention_blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        """[batch, kv heads, length, head dim] of one block's k (and v)."""
        raise NotImplementedError

    def _zeros(self, batch: int, length: int) -> torch.Tensor:
        # zeros, not empty: masked slots still enter probs @ V, and 0 * NaN would poison it
        w = next(self.parameters())
        return torch.zeros(self.kv_shape(batch, length), dtype=w.dtype, device=w.device)

    def setup_caches(self, batch: int, length: int) -> None:
        """Allocate a zeroed KV cache of `length` slots per block (kept when the shape is unchanged)."""
        old = self.attention_blocks()[0].attn.kv_cache
        dtype = next(self.parameters()).dtype
        if old is not None and old.k.shape[0] == batch and old.k.shape[2] == length and old.k.dtype == dtype:
            return
        for block in self.attention_blocks():
            block.attn.kv_cache = KVCache(self._zeros(batch, length), self._zeros(batch, length))

    def new_caches(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (k, v) :meth:`kv_shape` per block, owned by the caller (see the forward's `caches`)."""
        return [(self._zeros(batch, length), self._zeros(batch, length)) for _ in self.attention_blocks()]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Shrink the caches to the batch rows `rows` [B'] (finished rows leave the batch)."""
        for block in self.attention_blocks():
            cache = block.attn.kv_cache
            cache.k, cache.v = cache.k.index_select(0, rows), cache.v.index_select(0, rows)
