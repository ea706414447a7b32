"""The decode step as CUDA graphs: one per batch-size bucket and cache length, captured on first use.

One graph holds a whole step: the base's decode on the capture stream, a Memory
Decoder's on a side stream (fork and join by events) or an MLP Memory's after
the base, then :func:`memdec_fast.ops.sample_rows` into static token and
log-prob buffers. Everything a step touches stays at fixed addresses: the KV
caches (views of one pool per model, shared by every bucket), the valid-slot
mask, the positions, the next slot, the tokens and the [B, 7] parameter table.
The sampler reads its Philox seed and offset from device memory, so each replay
draws fresh numbers; sessions re-seed the graphs' own generator.

A batch of n rows runs in the bucket of the next power of two. Padding rows
repeat the last real row, so they compute finite values that nobody reads.
Prefill stays eager (one forward per model). Anything a graph cannot serve
decodes eagerly, after one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from memdec_fast import ops
from memdec_fast.models import LeanRunner, MLPMemory
from memdec_fast.models.runners import DecodeState
from memdec_fast.params import Param

__all__ = [
    "DecodeGraphs", "GraphSession", "batch_bucket", "decode_graphs", "fill_param_table", "length_bucket",
    "pad_index", "pad_rows", "unsupported_reason",
]

logger = logging.getLogger(__name__)

MAX_BATCH = 256
"""Largest batch bucket; bigger batches decode eagerly."""
MIN_SLOTS = 64
"""Smallest cache-length bucket, so that short requests share one graph."""

Prefill = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""(input_ids [B, T], attention_mask [B, T], cache slots) -> (base_logits, mem_logits) [B, V]."""


def batch_bucket(rows: int, max_batch: int = MAX_BATCH) -> int | None:
    """The batch size a graph runs `rows` rows at: the next power of two, or None above `max_batch`.

    Example
    -------
    >>> [batch_bucket(n) for n in (1, 2, 3, 5, 64, 65)]
    [1, 2, 4, 8, 64, 128]
    """
    if rows < 1:
        raise ValueError(f"rows: expected >= 1, got {rows}")
    bucket = 1 << (rows - 1).bit_length()
    return bucket if bucket <= max_batch else None


def length_bucket(slots: int, context: int) -> int:
    """Cache slots of a graph for a request needing `slots`: the next power of two, at least
    :data:`MIN_SLOTS`, at most `context` (attention reads every slot, so the bucket stays tight).
    """
    if not 1 <= slots <= context:
        raise ValueError(f"slots: expected 1 <= slots <= {context}, got {slots}")
    return min(max(1 << (slots - 1).bit_length(), MIN_SLOTS), context)


def pad_index(rows: int, bucket: int) -> list[int]:
    """Which real row each of the bucket's rows copies: the rows themselves, then the last one repeated."""
    if not 1 <= rows <= bucket:
        raise ValueError(f"rows: expected 1 <= rows <= bucket={bucket}, got {rows}")
    return list(range(rows)) + [rows - 1] * (bucket - rows)


def pad_rows(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """x: [n, ...] -> [bucket, ...], padded by repeating the last row; x[:n] is unchanged."""
    return x[pad_index(x.shape[0], bucket)]


def fill_param_table(table: torch.Tensor, params: dict[str, Param], rows: int) -> None:
    """Pack `rows` rows' sampling parameters into the static table [bucket, 7] in place, padded like the rows.

    Parameters
    ----------
    table : Tensor [bucket, 7] float32, columns :data:`memdec_fast.ops.ROW_PARAM_COLUMNS`
    params : name -> float, or Tensor [rows]; already checked
    rows : int, the real rows
    """
    packed = ops.pack_row_params(rows, table.device, **params)  # [rows, 7]
    table.copy_(packed[pad_index(rows, table.shape[0])])


def unsupported_reason(
    device: torch.device, base: object, memory: object, reference: bool, compiled: bool
) -> str | None:
    """Why a decode step cannot run as a CUDA graph, or None when it can. Touches no device."""
    if device.type != "cuda":
        return f"the models are on {device.type}, not CUDA"
    if reference:
        return "reference=True runs the reference ops"
    if not compiled:
        return "the compiled extension memdec_fast._C is missing (the graph samples with its CUDA kernel)"
    if not isinstance(base, LeanRunner):
        return "the base runs in transformers (only memdec_fast's GPT-2 and Llama family have a static cache)"
    if memory is not None and not isinstance(memory, (LeanRunner, MLPMemory)):
        return "the memory runs in transformers (only memdec_fast's GPT-2 and Llama family have a static cache)"
    return None


def decode_graphs(
    base: object, memory: object, vocab: int, context: int, side: torch.cuda.Stream | None, reference: bool = False,
) -> DecodeGraphs | None:
    """:class:`DecodeGraphs` for these models, or None (after one log line saying why) when unsupported."""
    reason = unsupported_reason(base.device, base, memory, reference, ops.compiled_available())
    if reason is None:
        return DecodeGraphs(base, memory, vocab, context, side)
    level = logging.WARNING if base.device.type == "cuda" else logging.INFO
    logger.log(level, "memdec_fast: CUDA graphs off, decoding eagerly: %s", reason)
    return None


@dataclass
class _Entry:
    """The static buffers of one (batch bucket, cache length) graph."""

    states: list[DecodeState]  # one per lean runner: the base, then a Memory Decoder
    tokens: torch.Tensor  # [bucket] int64: read by the step, then overwritten with its samples
    logprobs: torch.Tensor  # [bucket] float32
    table: torch.Tensor  # [bucket, 7] float32 sampling parameters
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """The decode-step graphs of one base and memory (a Memory Decoder, an MLP Memory, or None).

    Parameters
    ----------
    base : LeanRunner (GPT2Runner or LlamaRunner)
    memory : LeanRunner, MLPMemory, or None for the base alone (sampling its own logits with lmbda 0)
    vocab : int, the tokenizer's vocabulary; padded logit rows are cut
    context : int, the longest cache either model may use
    side : torch.cuda.Stream for a Memory Decoder's work, or None
    max_batch : int, the largest batch bucket
    replay : bool
        False runs the same static-buffer step eagerly instead of capturing it
        (to tell capture problems from bookkeeping ones; it also runs on the CPU).

    Example
    -------
    >>> graphs = DecodeGraphs(base_runner, memory_runner, len(tokenizer), 1024, torch.cuda.Stream())
    >>> session = graphs.session(rows=3, slots=40, params=params, seed=0, prefill=prefill_fn)
    >>> tokens, logprobs = session.start(input_ids, attention_mask)  # [3], [3]
    >>> tokens, logprobs = session.step()  # one graph replay
    """

    def __init__(
        self, base: LeanRunner, memory: LeanRunner | MLPMemory | None, vocab: int, context: int,
        side: torch.cuda.Stream | None, max_batch: int = MAX_BATCH, replay: bool = True,
    ):
        self.base, self.memory, self.vocab, self.context, self.max_batch = base, memory, vocab, context, max_batch
        self.device, self.replay = base.device, replay
        self.decoder = isinstance(memory, LeanRunner)
        self.side = side if self.decoder else None
        self.runners = [base] + ([memory] if self.decoder else [])
        self.rng = torch.Generator(self.device)
        if replay:
            self.stream = torch.cuda.Stream(self.device)  # warm-up and capture
            self.mempool = torch.cuda.graph_pool_handle()  # shared: graphs replay one at a time
        self.pools: list[torch.Tensor] = []  # per runner: [2 * n_layer, capacity * kv_width]
        self.capacity = 0  # batch rows x cache slots the pools hold
        self.entries: dict[tuple[int, int], _Entry] = {}
        self._too_big_logged = False

    def session(
        self, rows: int, slots: int, params: dict[str, Param], seed: int | None, prefill: Prefill
    ) -> GraphSession | None:
        """A decode session for `rows` prompts needing `slots` cache slots; None (decode eagerly) when the batch is
        too big or its caches do not fit in GPU memory."""
        bucket = batch_bucket(rows, self.max_batch)
        if bucket is None:
            if not self._too_big_logged:
                logger.info("memdec_fast: %d rows exceed the largest CUDA-graph bucket (%d); decoding eagerly",
                            rows, self.max_batch)
                self._too_big_logged = True
            return None
        length = length_bucket(slots, self.context)
        try:
            entry = self.entry(bucket, length)
        except torch.cuda.OutOfMemoryError:
            self.drop_pools()
            logger.warning("memdec_fast: no GPU memory for CUDA-graph caches of %d rows x %d slots; decoding this "
                           "request eagerly", bucket, length)
            return None
        with torch.inference_mode():
            fill_param_table(entry.table, params, rows)
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(seed)
        return GraphSession(self, entry, rows, prefill)

    def drop_pools(self) -> None:
        """Free the KV pools and every graph. The runners let go of their views first, or the pools would stay."""
        for runner in self.runners:
            runner.unbind()
        self.entries.clear()
        if self.replay:
            self.mempool = torch.cuda.graph_pool_handle()  # the old handle's graphs are gone: never capture into it
        self.pools, self.capacity = [], 0

    @torch.inference_mode()
    def entry(self, bucket: int, slots: int) -> _Entry:
        """The buffers of one graph, allocated on first use; growing the pools drops every graph."""
        key = (bucket, slots)
        if key in self.entries:
            return self.entries[key]
        if bucket * slots > self.capacity:
            self.drop_pools()  # before allocating, so that the old and new pools are never alive at once
            self.pools = [
                # empty: each session zeroes the slots its prompt does not fill (see zero_slots)
                torch.empty(2 * r.num_layers, bucket * slots * r.kv_width, dtype=r.dtype, device=self.device)
                for r in self.runners
            ]
            self.capacity = bucket * slots
        states = []
        for runner, pool in zip(self.runners, self.pools):
            shape = (bucket, runner.kv_heads, slots, runner.head_dim)  # a contiguous prefix of each pool row
            views = [row[: bucket * slots * runner.kv_width].view(shape) for row in pool]
            states.append(DecodeState(
                list(zip(views[0::2], views[1::2])),
                torch.zeros(bucket, slots, dtype=torch.bool, device=self.device),
                torch.zeros(bucket, 1, dtype=torch.int64, device=self.device),
                torch.zeros(1, dtype=torch.int64, device=self.device),
            ))
        entry = _Entry(
            states,
            torch.zeros(bucket, dtype=torch.int64, device=self.device),
            torch.zeros(bucket, dtype=torch.float32, device=self.device),
            ops.pack_row_params(bucket, self.device),
        )
        self.entries[key] = entry
        return entry

    def zero_slots(self, entry: _Entry, first: int) -> None:
        """Zero the cache slots from `first` on, in every row of entry's caches: one kernel per model.

        An earlier request may have left NaN or inf there, and masked slots still
        enter probs @ V, where 0 * NaN = NaN.
        """
        for pool, state in zip(self.pools, entry.states):
            k = state.caches[0][0]  # [bucket, H, S, Dh], a prefix of each pool row
            pool[:, : k.numel()].view(len(pool), *k.shape)[:, :, :, first:].zero_()

    def bind(self, entry: _Entry) -> None:
        for runner, state in zip(self.runners, entry.states):
            runner.bind(state)

    def step(self, entry: _Entry) -> None:
        """One decode step from entry.tokens, sampled back into entry.tokens and entry.logprobs."""
        # a finished row still in the batch may have sampled -1 (NaN logits); it must still embed (a live row's -1
        # never gets here: the generator raises first)
        entry.tokens.clamp_min_(0)
        if self.side is not None:
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)  # fork
            done = torch.cuda.Event()
            try:
                with torch.cuda.stream(self.side):
                    mem_logits = self.memory.decode(entry.tokens)[0]
                base_logits = self.base.decode(entry.tokens)[0]
            finally:  # join, even after an error: a capture must not end with the side stream forked
                done.record(self.side)
                main.wait_event(done)
        elif self.decoder:
            mem_logits = self.memory.decode(entry.tokens)[0]
            base_logits = self.base.decode(entry.tokens)[0]
        elif self.memory is not None:
            base_logits, hidden = self.base.decode(entry.tokens)
            mem_logits = self.memory(hidden)
        else:
            base_logits = mem_logits = self.base.decode(entry.tokens)[0]
        tokens, logprobs = ops.sample_rows(base_logits[:, : self.vocab], mem_logits[:, : self.vocab], entry.table,
                                           self.rng)
        entry.tokens.copy_(tokens)
        entry.logprobs.copy_(logprobs)

    def capture(self, entry: _Entry) -> None:
        """Warm up on the capture streams, undo the warm-up's effects, then capture one step.

        A failure logs one line and turns replay off: this step and every later one run eagerly.
        """
        main = torch.cuda.current_stream(self.device)
        saved = [(s.valid.clone(), s.positions.clone(), s.input_pos.clone()) for s in entry.states]
        tokens, rng_state = entry.tokens.clone(), self.rng.get_state()
        try:
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                # lazy initialisation (cuBLAS workspaces, kernel loading) must not happen under capture; one
                # step only, as its cache write lands in the slot the next real step overwrites anyway
                self.step(entry)
            main.wait_stream(self.stream)
            _restore(entry, saved, tokens)
            self.rng.set_state(rng_state)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.rng)
            with torch.cuda.graph(graph, pool=self.mempool, stream=self.stream):
                self.step(entry)
        except RuntimeError as err:  # CUDA errors and out-of-memory; an eager step raises again if they persist
            torch.cuda.set_stream(main)  # torch.cuda.graph leaves its stream current when capture_end raises
            main.wait_stream(self.stream)
            _restore(entry, saved, tokens)
            self.rng = torch.Generator(self.device)  # the old one may be stuck mid-capture
            self.rng.set_state(rng_state)
            self.replay = False
            for e in self.entries.values():
                e.graph = None
            logger.warning("memdec_fast: CUDA-graph capture failed, decoding eagerly from now on: %s", err)
            return
        entry.graph = graph


def _restore(entry: _Entry, saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], tokens: torch.Tensor) -> None:
    """Put back the decode state and tokens saved before a warm-up step."""
    for state, (valid, positions, input_pos) in zip(entry.states, saved):
        state.valid.copy_(valid)
        state.positions.copy_(positions)
        state.input_pos.copy_(input_pos)
    entry.tokens.copy_(tokens)


class GraphSession:
    """One generate() call on the graphs: eager prefill and first sample, then one replay per token.

    Rows are those of the request, in order; the outputs are views of the static
    buffers, valid until the next call.
    """

    def __init__(self, graphs: DecodeGraphs, entry: _Entry, rows: int, prefill: Prefill):
        self.graphs, self.entry, self.rows, self.prefill = graphs, entry, rows, prefill
        self.slots = entry.states[0].valid.shape[1]

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill the (padded) prompts into the static caches and sample the first token of each row."""
        # input_ids, attention_mask: [rows, T] -> tokens [rows] int64, logprobs [rows] float32
        e, bucket = self.entry, self.entry.tokens.shape[0]
        self.graphs.bind(e)
        self.graphs.zero_slots(e, input_ids.shape[1])  # the prefill fills slots [0, T)
        base_logits, mem_logits = self.prefill(pad_rows(input_ids, bucket), pad_rows(attention_mask, bucket), self.slots)
        tokens, logprobs = ops.sample_rows(base_logits, mem_logits, e.table, self.graphs.rng)
        e.tokens.copy_(tokens)
        e.logprobs.copy_(logprobs)
        return e.tokens[: self.rows], e.logprobs[: self.rows]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay one decode step. `tokens` is ignored: the last samples already sit in the static buffer."""
        e, graphs = self.entry, self.graphs
        if graphs.replay and e.graph is None:
            graphs.capture(e)  # on failure replay is off, and the step below runs eagerly
        if e.graph is None:
            graphs.step(e)
        else:
            e.graph.replay()
        return self.entry.tokens[: self.rows], self.entry.logprobs[: self.rows]

    @torch.inference_mode()
    def keep_rows(self, rows: torch.Tensor) -> None:
        """Continue with the rows `rows` [n] only, in the (smaller) bucket of n rows."""
        old, n = self.entry, rows.numel()
        new = self.graphs.entry(batch_bucket(n, self.graphs.max_batch), self.slots)
        idx = pad_rows(rows, new.tokens.shape[0])
        # the pools' views alias row for row, so gather into a temporary before writing
        for s0, s1 in zip(old.states, new.states):
            for (k0, v0), (k1, v1) in zip(s0.caches, s1.caches):
                k1.copy_(k0.index_select(0, idx))
                v1.copy_(v0.index_select(0, idx))
            s1.valid.copy_(s0.valid[idx])
            s1.positions.copy_(s0.positions[idx])
            s1.input_pos.copy_(s0.input_pos)
        new.table.copy_(old.table[idx])
        new.tokens.copy_(old.tokens[idx])
        self.entry, self.rows = new, n
        self.graphs.bind(new)
