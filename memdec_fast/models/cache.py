"""The static KV cache of the lean models (GPT-2, the Llama family): owned by the caller, such as the engine's
slots (:class:`SlotCache`), each row written at its own positions by :func:`write_rows`. It is only written in
place, so that a CUDA graph may hold its addresses.
"""

from __future__ import annotations

import itertools
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


class Mixed(NamedTuple):
    """The rows of a packed batch that mixes one-token rows (decode) with longer ones (prompt chunks), as
    :func:`attend_cache` splits them: every row's first token attends as a decode step, the longer rows again over
    all their tokens.

    first: [B] each row's first token in the packed [N]; rows: [R] the longer rows; tokens: [N_R] their tokens in the
    packed [N]; packing: theirs among themselves, in the same width.
    """

    first: torch.Tensor
    rows: torch.Tensor
    tokens: torch.Tensor
    packing: Packing


class Packing(NamedTuple):
    """The real tokens of a right-padded batch [B, T]: the lean models run their linear layers over these N tokens
    only (a prefill of chunks of unequal lengths spends no GEMM rows on padding) and lay them out as [B, T] again
    for attention.

    lengths: real tokens per row (on the host); width: T; idx: [N] their flat indices in B * T; mixed: where one-token
    rows sit beside longer ones (a prefill and a decode step in one forward), else None.
    """

    lengths: tuple[int, ...]
    width: int
    idx: torch.Tensor
    mixed: Mixed | None = None

    @classmethod
    def of(cls, lengths: list[int], width: int, device: torch.device) -> Packing | None:
        """The packing of rows of `lengths` tokens right-padded to `width`, or None when no row is padded."""
        if all(n == width for n in lengths):
            return None
        return cls._of(lengths, width, device)

    @classmethod
    def _of(cls, lengths: list[int], width: int, device: torch.device) -> Packing:
        """:meth:`of`, padded or not."""
        idx = torch.cat([torch.arange(b * width, b * width + n) for b, n in enumerate(lengths)])
        longer = [b for b, n in enumerate(lengths) if n > 1]
        mixed = None
        if 0 < len(longer) < len(lengths):
            first = [0, *itertools.accumulate(lengths)][:-1]
            tokens = torch.cat([torch.arange(first[b], first[b] + lengths[b]) for b in longer])
            sub = cls._of([lengths[b] for b in longer], width, device)
            mixed = Mixed(*(torch.tensor(x, device=device) for x in (first, longer)), tokens.to(device), sub)
        return cls(tuple(lengths), width, idx.to(device), mixed)

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


def attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor | None,
                 cache: SlotCache | None, scale: float | None = None, packing: Packing | None = None) -> torch.Tensor:
    """Write the batch's keys and values into `cache` at `slots` (:func:`write_rows`), then attend its queries over
    the cache rows (:func:`attend`); without a cache, attend over the batch's own keys and values under `mask`.

    Without `packing`: q [B, Hq, T, Dh], k, v [B, Hkv, T, Dh] -> [B, Hq, T, Dh]. With it: the real tokens only,
    q [N, Hq, Dh], k, v [N, Hkv, Dh] -> [N, Hq, Dh]; a batch that mixes one-token rows with longer ones
    (:class:`Mixed`) attends every row's first token as a decode step over all rows (cache views, no copy) and
    then only the longer rows over all their tokens (their caches gathered), instead of padding every row to the
    longest. Hq = G * Hkv: the G query heads of a KV head read it once. mask: [B, 1, T, S]; slots: [B, T].
    """
    if packing is None:
        return _attend_cache(q, k, v, mask, slots, cache, scale)
    m = packing.mixed
    if m is None:
        q, k, v = (packing.unpack(t).transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
        return packing.pack(_attend_cache(q, k, v, mask, slots, cache, scale).transpose(1, 2))
    y = torch.empty_like(q)  # [N, Hq, Dh]; every token is written below
    q1, k1, v1 = (t.index_select(0, m.first)[:, :, None] for t in (q, k, v))  # [B, H, 1, Dh]
    y[m.first] = _attend_cache(q1, k1, v1, mask[:, :, :1], slots[:, :1], cache, scale)[:, :, 0]
    q, k, v = (m.packing.unpack(t.index_select(0, m.tokens)).transpose(1, 2) for t in (q, k, v))  # [R, H, T', Dh]
    T = q.shape[2]
    rows = m.rows + cache.rows.start if isinstance(cache.rows, slice) else cache.rows.index_select(0, m.rows)
    out = _attend_cache(q, k, v, mask.index_select(0, m.rows)[:, :, :T], slots.index_select(0, m.rows)[:, :T],
                        cache._replace(rows=rows), scale).transpose(1, 2)  # [R, T', Hq, Dh]
    y[m.tokens] = m.packing.pack(out)
    return y


def _attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor | None,
                  cache: SlotCache | None, scale: float | None) -> torch.Tensor:
    """:func:`attend_cache` of a padded batch: q [B, Hq, T, Dh], k, v [B, Hkv, T, Dh] -> [B, Hq, T, Dh]."""
    B, Hq, T, D = q.shape
    if cache is not None:
        k, v = write_rows(cache, slots, k, v)  # [B, Hkv, S', Dh]
    return attend(q.reshape(B, k.shape[1], Hq // k.shape[1] * T, D), k, v, mask, scale).reshape(B, Hq, T, D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
           ) -> torch.Tensor:
    """Masked attention over a slot cache: softmax(q k^T * scale, where mask) v.

    q: [B, Hkv, G * T, Dh], the G query heads of each KV head one after another (G = 1 without grouped
    queries: K and V are read once, never repeated in memory); k, v: [B, Hkv, S, Dh]; mask: [B, 1, T, S]
    bool, True = attend, at least one True per query (tiled G times here) -> [B, Hkv, G * T, Dh]. A decode
    step of many rows on the CPU (T = 1) runs as two batched matmuls; anything else runs
    ``F.scaled_dot_product_attention``.
    """
    T = mask.shape[2]
    if T > 1 and q.shape[2] > T:
        mask = mask.repeat(1, 1, q.shape[2] // T, 1)
    if q.device.type != "cpu" or q.shape[0] < DECODE_ROWS or T != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q * (q.shape[-1] ** -0.5 if scale is None else scale), k.transpose(-1, -2))  # [B, H, G, S]
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
