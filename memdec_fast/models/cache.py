"""The static KV cache of the lean models (GPT-2, the Llama family): owned by the caller, such as the engine's
slots (:class:`SlotCache`), each row written at its own positions by :func:`write_rows`. It is only written in
place, so that a CUDA graph may hold its addresses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
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


class Packing(NamedTuple):
    """The real tokens of a right-padded batch [B, T]: the lean models run their linear layers over these N tokens
    only (a prefill of chunks of unequal lengths spends no GEMM rows on padding) and lay them out as [B, T] again
    for attention.

    lengths: real tokens per row (on the host); width: T; idx: [N] their flat indices in B * T.
    """

    lengths: tuple[int, ...]
    width: int
    idx: torch.Tensor

    @classmethod
    def of(cls, lengths: list[int], width: int, device: torch.device) -> Packing | None:
        """The packing of rows of `lengths` tokens right-padded to `width`, or None when no row is padded."""
        if all(n == width for n in lengths):
            return None
        idx = torch.cat([torch.arange(b * width, b * width + n) for b, n in enumerate(lengths)])
        return cls(tuple(lengths), width, idx.to(device))

    def select(self, rows: list[int]) -> Packing | None:
        """The packing of a subset of the rows, in that order."""
        return Packing.of([self.lengths[b] for b in rows], self.width, self.idx.device)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]: the real tokens."""
        return x.reshape(len(self.lengths) * self.width, *x.shape[2:]).index_select(0, self.idx)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at the padding."""
        out = x.new_zeros(len(self.lengths) * self.width, *x.shape[1:])
        return out.index_copy_(0, self.idx, x).view(len(self.lengths), self.width, *x.shape[1:])


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


DECODE_ROWS = 8
"""From this many rows, a CPU decode step attends with two matmuls instead of torch's flash kernel (measured in
benchmarks/NOTES.md, "Engine speed": 0.58 against 0.99 ms per block at 32 rows over 128 slots, even at 8)."""


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
           ) -> torch.Tensor:
    """Masked attention over a slot cache: softmax(q k^T * scale, where mask) v.

    q: [B, H, Tq, Dh]; k, v: [B, H, S, Dh]; mask: [B, 1, Tq or 1, S] bool, True = attend, at least one True per
    query -> [B, H, Tq, Dh]. A decode step of many rows on the CPU (one query per row and head) runs as two
    batched matmuls; anything else runs ``F.scaled_dot_product_attention``.
    """
    if q.device.type != "cpu" or q.shape[0] < DECODE_ROWS or mask.shape[2] != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q * (q.shape[-1] ** -0.5 if scale is None else scale), k.transpose(-1, -2))  # [B, H, Tq, S]
    return torch.matmul(scores.masked_fill_(~mask, float("-inf")).softmax(-1), v)


class CachedDecoder(nn.Module):
    """A decoder whose blocks each read one :class:`SlotCache`; subclasses name their blocks
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

    def new_caches(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed (k, v) :meth:`kv_shape` per block, owned by the caller (see the forward's `caches`)."""
        return [(self._zeros(batch, length), self._zeros(batch, length)) for _ in self.attention_blocks()]
