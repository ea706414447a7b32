"""The one decode step: a model pair's work over cache slots, for the Engine and JointGenerator alike.

Each step is one prefill of prompt chunks, one decode step of every busy slot, or (eagerly) both in one forward.

Caches: per model and block, (k, v) [max_batch, H, S + 1, Dh] with S the engine's context; row i is
slot i. A request's token at position p is written to slot p of its row, so requests of any lengths
share one batch without left padding (see :meth:`memdec_fast.models.LeanRunner.slot_forward`). Slot S
is scratch: the right padding of a batched prefill writes there, and attention never reads it.

Prefill: the chunks of one engine step, from any number of requests, run as one right-padded forward.
An eager step (no CUDA graphs) runs them together with the step's decode rows, in one forward
(:meth:`ModelStep.prefill_decode`).

A decode step runs rows [0, Bk) and reads cache slots [0, L). Replayed as CUDA graphs, Bk is the
batch bucket (next power of two, capped at max_batch) of the highest busy slot + 1 and L the length
bucket of the longest row, so that few graphs serve all steps; eagerly (the CPU), Bk is the highest
busy slot + 1 and L the longest row's length: no padded row or slot costs compute. Rows in that range
that do not decode (free slots, requests still prefilling) feed a dummy token at their next write
position; that slot is overwritten before anything reads it.

Everything the step reads sits in static buffers (tokens, positions, the [max_batch, 7] parameter
table), so on CUDA the step of each (Bk, L) is captured once as a CUDA graph and replayed; anywhere
else, or when capture fails, the very same function runs eagerly (one log line says why). Rows share
one batched sampler call inside the step; a row that must draw from its own generator (a seeded request)
is sampled again from the step's logits, outside the graph, by the caller.

Several memories over one base (a ModelStep of several pairs sharing one base runner): each slot
uses one memory, or none (the base alone). The base runs once over all rows; each Memory Decoder
runs over the rows that use it, gathered by index; an MLP Memory reads its rows' hidden states.
Their logits land in one [B, V] tensor (index_copy; a base-alone row keeps the base's logits there,
which its lmbda 0 ignores), and the one sampler call reads each row's parameters from the table.
A slot uses one memory at a time, so Memory Decoders of one cache shape share one set of slot
caches (all max_batch slots): the caches are those of one pair per decoder shape, however many
memories there are (a request overwrites each position before reading it, and release zeroes what
the slot's last request wrote, whichever memory wrote it). Such a step runs eagerly: its row sets
change from step to step, and a graph would have to be captured per set (one log line says so). A
step of one pair is exactly the single-memory step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from memdec_fast import ops
from memdec_fast.models.cache import Packing
from memdec_fast.models.pair import Logits, ModelPair
from memdec_fast.ops import reference
from memdec_fast.ops.params import Param

logger = logging.getLogger(__name__)

MIN_LENGTH = 64
"""Smallest cache-length bucket a decode step reads, so that short requests share one graph."""


def batch_bucket(rows: int, max_batch: int) -> int:
    """Rows a decode step runs for `rows` busy rows: the next power of two, at most max_batch.

    Example
    -------
    >>> [batch_bucket(n, 32) for n in (1, 2, 3, 5, 33)]
    [1, 2, 4, 8, 32]
    """
    return min(1 << (rows - 1).bit_length(), max_batch)


def length_bucket(length: int, context: int) -> int:
    """Cache slots a decode step reads for rows reaching `length` positions: the next power of two, at least
    :data:`MIN_LENGTH`, at most `context` (attention reads every slot, so the bucket stays tight)."""
    if not 1 <= length <= context:
        raise ValueError(f"length: expected 1 <= length <= {context}, got {length}")
    return min(max(1 << (length - 1).bit_length(), MIN_LENGTH), context)


def graph_reason(pair: ModelPair, memories: int = 1) -> str | None:
    """Why the pair's decode step (over `memories` pairs sharing its base) cannot run as a CUDA graph, or None
    when it can. Touches no device."""
    if memories > 1:
        return (f"{memories} memories share the base: each step gathers each memory's rows by index, and those "
                "row sets change from step to step")
    if pair.device.type != "cuda":
        return f"the models are on {pair.device.type}, not CUDA"
    if pair.reference:
        return "reference=True runs the reference ops"
    if not ops.compiled_available():
        return "the compiled extension memdec_fast._C is missing (the graph samples with its CUDA kernel)"
    return None


def cache_bytes(pair: ModelPair | list, slots: int, length: int) -> int:
    """Bytes of the pair's slot caches (or those of a list of lean runners): per runner and block, k and v
    [slots, Hkv, length, Dh]."""
    total = 0
    for r in pair if isinstance(pair, list) else pair.runners():
        model = r.model
        elements = math.prod(model.kv_shape(slots, length))
        total += 2 * len(model.attention_blocks()) * elements * next(model.parameters()).element_size()
    return total


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: no check
        return 1 << 62


def check_cache_fits(pair: ModelPair | list, slots: int, length: int, device: torch.device | None = None) -> None:
    """ValueError naming the sizes when the caches would not fit in memory: refuse before the allocator (or the
    OOM killer, which may pick another process) decides. `pair` as in :func:`cache_bytes` (a list needs
    `device`)."""
    device = device or pair.device
    need, free = cache_bytes(pair, slots, length), available_bytes(device)
    if need > free:
        raise ValueError(f"the KV caches of {slots} slots x {length} positions need {need / 2**30:.1f} GiB, but "
                         f"{free / 2**30:.1f} GiB are available on {device}: lower --max-batch or --max-context")


class ModelStep:
    """Slot caches, static step buffers and (on CUDA) the decode graphs of one lean model pair.

    Parameters
    ----------
    pair : ModelPair on memdec_fast's lean models (``pair.lean``), or {name: ModelPair} sharing one base runner
        (several memories: see the module's docstring; :meth:`set_memory` says which one a slot uses)
    context : int, positions per row (the caches hold one more slot: scratch for prefill padding)
    max_batch : int, cache rows
    cuda_graphs : bool, capture decode steps on CUDA (ignored elsewhere)

    Example
    -------
    >>> step = ModelStep(pair, context=256, max_batch=4)
    >>> logits = step.prefill([(0, [464, 3290], 0), (1, [318], 0)])  # two [2, V]
    >>> logits, tokens, logprobs = step.decode([11, 12], [2, 1])  # rows 0 and 1, at their next positions
    """

    def __init__(self, pair: ModelPair | Mapping[str, ModelPair], context: int, max_batch: int,
                 cuda_graphs: bool = True):
        named = dict(pair) if isinstance(pair, Mapping) else {"memory": pair}
        self.pairs = list(named.values())
        pair = self.pairs[0]
        if not pair.lean:
            arch = getattr(pair.base.model.config, "model_type", None) or type(pair.base.model).__name__
            raise ValueError(f"Engine: the base is a {arch!r} model running in transformers; the engine's slot caches "
                             "serve memdec_fast's lean models only (GPT-2, Llama, Qwen2, Mistral): use JointGenerator")
        self.pair, self.context, self.max_batch = pair, context, max_batch
        self.device = pair.device
        self.reference = pair.reference or not ops.compiled_available()
        self.on_device_rng = self.device.type == "cuda" and not self.reference
        self.multi = len(self.pairs) > 1
        if self.multi:
            _check_shared_base(named)
            # the base, then one runner per Memory Decoder cache shape: decoders of one shape share their caches
            shapes = {_cache_shape(p.memory): p.memory for p in self.pairs if not p.is_mlp}
            runners = [pair.base, *shapes.values()]
            check_cache_fits(runners, max_batch, context + 1, self.device)
            self.caches = [r.new_slot_caches(max_batch, context + 1) for r in runners]
            by_shape = dict(zip(shapes, self.caches[1:]))
            self.memory_caches = [None if p.is_mlp else by_shape[_cache_shape(p.memory)] for p in self.pairs]
        else:
            check_cache_fits(pair, max_batch, context + 1)
            self.caches = pair.new_slot_caches(max_batch, context + 1)  # slot `context`: scratch
        self.slot_memory = [-1 if self.multi else 0] * max_batch
        """Per slot, the index in :attr:`pairs` of the memory it uses, or -1 for the base alone (several memories)."""
        self.tokens = torch.zeros(max_batch, dtype=torch.int64, device=self.device)  # [max_batch] fed tokens
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=self.device)  # [max_batch] their positions
        self.table = ops.pack_row_params(max_batch, self.device)  # [max_batch, 7] sampling parameters per slot
        self.out_tokens = torch.zeros(max_batch, dtype=torch.int64, device=self.device)  # [max_batch] samples
        self.out_logprobs = torch.zeros(max_batch, dtype=torch.float32, device=self.device)  # [max_batch]
        self.rng = torch.Generator(self.device if self.on_device_rng else "cpu")
        self.rng.seed()
        reason = graph_reason(pair, len(self.pairs))
        self.replay = cuda_graphs and reason is None
        if cuda_graphs and reason is not None:
            level = logging.WARNING if self.device.type == "cuda" else logging.INFO
            logger.log(level, "memdec_fast: CUDA graphs off, decoding eagerly: %s", reason)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Logits]] = {}
        if self.replay:
            self.stream = torch.cuda.Stream(self.device)  # warm-up and capture
            self.mempool = torch.cuda.graph_pool_handle()  # shared: graphs replay one at a time

    def bucket(self, rows: int) -> int:
        """Rows a decode step runs when rows [0, rows) are busy: :func:`batch_bucket` when steps replay as
        graphs, else `rows`."""
        return batch_bucket(rows, self.max_batch) if self.replay else rows

    # -- per-slot state ---------------------------------------------------------------------------

    def new_rng(self, seed: int) -> torch.Generator:
        """A seeded generator, on the device the sampler draws from (same seed, same tokens)."""
        return torch.Generator(self.device if self.on_device_rng else "cpu").manual_seed(seed)

    @torch.inference_mode()
    def set_params(self, first: int, params: dict[str, Param], rows: int = 1) -> None:
        """Write the sampling parameters of slots [first, first + rows): scalars, or tensors [rows]."""
        self.table[first : first + rows].copy_(ops.pack_row_params(rows, self.device, **params))

    def set_memory(self, slot: int, memory: int) -> None:
        """The memory `slot` uses from now on: an index in :attr:`pairs`, or -1 for the base alone. A step of one
        pair ignores it (its rows' lmbda says how much of the memory they take)."""
        if not -1 <= memory < len(self.pairs):
            raise ValueError(f"memory: expected -1 <= memory < {len(self.pairs)}, got {memory}")
        self.slot_memory[slot] = memory

    @torch.inference_mode()
    def clear_slot(self, slot: int, upto: int | None = None) -> None:
        """Zero a slot's cache positions [0, upto) (None: all): masked positions still enter probs @ V, where a
        NaN left by the slot's previous request would give 0 * NaN = NaN."""
        for caches in self.caches:
            for k, v in caches:
                k[slot, :, :upto].zero_()
                v[slot, :, :upto].zero_()

    # -- sampling ---------------------------------------------------------------------------------

    def sample(self, logits: Logits, params: dict[str, Param], rng: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [B, V] sampled eagerly with their parameters (scalars or [B]): tokens [B], log p [B]."""
        fn = reference.sample if self.reference else ops.sample
        return fn(*logits, **params, generator=rng or self.rng)

    def sample_one(self, logits: Logits, params: dict[str, Param], rng: torch.Generator | None) -> tuple[int, float]:
        """One row [1, V] sampled eagerly, as it would be sampled alone: its token and log p."""
        token, logprob = self.sample(logits, params, rng)
        return int(token[0]), float(logprob[0])

    def _sample_table(self, base_logits: torch.Tensor, mem_logits: torch.Tensor, table: torch.Tensor):
        if not self.reference:
            return ops.sample_rows(base_logits, mem_logits, table, self.rng)
        cols = dict(zip(ops.ROW_PARAM_COLUMNS, table.unbind(1)))
        cols["top_k"] = cols["top_k"].long()
        return reference.sample(base_logits, mem_logits, **cols, generator=self.rng)

    # -- prefill ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[int, list[int], int]]) -> Logits:
        """Write prompt chunks into their slots, in one right-padded forward; the logits after each chunk.

        chunks: (slot, tokens, start): tokens go to positions [start, start + len(tokens)) of that
        slot. Returns (base_logits, mem_logits) [len(chunks), V], row i after chunk i's last token.
        """
        rows = torch.tensor([slot for slot, _, _ in chunks], device=self.device)  # [B]
        return self._forward(**self._padded([(t, start) for _, t, start in chunks]), rows=rows,
                             slot_ids=[slot for slot, _, _ in chunks])

    @torch.inference_mode()
    def prefill_decode(self, chunks: list[tuple[int, list[int], int]], tokens: list[int], positions: list[int]
                       ) -> tuple[Logits, list[int], list[float]]:
        """A prefill and a decode step in one eager forward over rows [0, len(tokens)): each row feeds its
        prompt chunk when `chunks` names its slot (as in :meth:`prefill`), else its token at its position
        (as in :meth:`decode`). Every linear layer then reads its weights once for both, and attention runs
        the one-token rows as a decode step (:func:`memdec_fast.models.cache.attend_cache`).

        Returns the logits after each row's last token (two [rows, V]) and each row's token and log p, drawn
        in one batched call with the parameter table and :attr:`rng`, as :meth:`decode` does.
        """
        if self.replay:
            raise RuntimeError("prefill_decode: steps that replay as CUDA graphs prefill and decode apart")
        seqs = [([t], p) for t, p in zip(tokens, positions)]
        for slot, chunk, start in chunks:
            seqs[slot] = (chunk, start)
        rows = len(tokens)
        logits = self._forward(**self._padded(seqs), rows=slice(0, rows), slot_ids=range(rows))
        out_tokens, out_logprobs = self._sample_table(*logits, self.table[:rows])
        return logits, out_tokens.tolist(), out_logprobs.tolist()

    def _padded(self, seqs: list[tuple[list[int], int]]) -> dict:
        """The right-padded batch of token runs (tokens, start) as :meth:`_forward`'s keyword arguments."""
        B, T = len(seqs), max(len(t) for t, _ in seqs)
        ids = torch.zeros(B, T, dtype=torch.int64)  # [B, T]; padding: token 0 ...
        pos = torch.zeros(B, T, dtype=torch.int64)  # ... at position 0 (it attends slot 0 only) ...
        slots = torch.full((B, T), self.context, dtype=torch.int64)  # ... written to the scratch slot
        for i, (tokens, start) in enumerate(seqs):
            n = len(tokens)
            ids[i, :n] = torch.tensor(tokens)
            pos[i, :n] = slots[i, :n] = torch.arange(start, start + n)
        last = torch.tensor([len(t) - 1 for t, _ in seqs])  # [B]
        return {"tokens": ids.to(self.device), "positions": pos.to(self.device), "slots": slots.to(self.device),
                "last": last.to(self.device), "length": max(start + len(t) for t, start in seqs),
                "packing": Packing.of([len(t) for t, _ in seqs], T, self.device)}  # the blocks skip the padding

    # -- decode -----------------------------------------------------------------------------------

    def _decode_body(self, rows: int, length: int) -> Logits:
        """The captured step: rows' tokens at their positions -> logits and samples in the static buffers."""
        logits = self._forward(self.tokens[:rows, None], self.positions[:rows, None], slice(0, rows), length,
                               slot_ids=range(rows))
        tokens, logprobs = self._sample_table(*logits, self.table[:rows])
        self.out_tokens[:rows].copy_(tokens)
        self.out_logprobs[:rows].copy_(logprobs)
        return logits

    @torch.inference_mode()
    def decode_rows(self, slots: list[int], tokens: list[int], positions: list[int]
                    ) -> tuple[Logits, list[int], list[float]]:
        """One eager decode step over the cache rows `slots` only (gathered by index, in that order), each row's
        token at its position: the step of :meth:`decode` without its rows that do not decode, for steps that do not
        replay. Returns the logits (two [len(slots), V]) and each row's token and log p, in the order of `slots`."""
        if self.replay:
            raise RuntimeError("decode_rows: steps that replay as CUDA graphs run rows [0, n) (decode)")
        idx = torch.tensor(slots, device=self.device)  # [B]
        ids = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, device=self.device)[:, None]  # [B, 1]
        logits = self._forward(ids, pos, idx, max(positions) + 1, slot_ids=slots)
        out_tokens, out_logprobs = self._sample_table(*logits, self.table.index_select(0, idx))
        return logits, out_tokens.tolist(), out_logprobs.tolist()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> tuple[Logits, list[int], list[float]]:
        """One decode step over rows [0, len(tokens)) (a :meth:`bucket` size), each row's token at its position;
        attention reads the slots [0, longest row], rounded up to :func:`length_bucket` when steps replay.

        Returns the logits (two [rows, V], views of static buffers, valid until the next step) and each
        row's token and log p, drawn in one batched call with the parameter table and :attr:`rng`.
        A row whose request samples with its own generator is sampled again from the logits by its caller.
        """
        rows = len(tokens)
        length = max(positions) + 1
        if self.replay:
            length = length_bucket(length, self.context)
        self.tokens[:rows].copy_(torch.tensor(tokens))
        self.positions[:rows].copy_(torch.tensor(positions))
        logits = self._run(rows, length)
        return logits, self.out_tokens[:rows].tolist(), self.out_logprobs[:rows].tolist()

    @torch.inference_mode()
    def decode_one(self, slot: int, token: int, position: int, params: dict[str, Param],
                   rng: torch.Generator | None) -> tuple[int, float]:
        """One row decoded alone, eagerly (no graph, no parameter table): the token and log p that row would
        get in a batched step. The engine's fallback when a batched step fails, to find the failing row."""
        ids = torch.tensor([[token]], device=self.device)  # [1, 1]
        pos = torch.tensor([[position]], device=self.device)  # [1, 1]
        return self.sample_one(self._forward(ids, pos, slice(slot, slot + 1), position + 1, slot_ids=[slot]),
                               params, rng)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: slice | torch.Tensor, length: int,
                 slots: torch.Tensor | None = None, last: torch.Tensor | None = None,
                 slot_ids: list[int] | range = (), packing: Packing | None = None) -> Logits:
        """The models over cache rows `rows` (see :meth:`ModelPair.slot_forward`): two [B, V]. slot_ids: the slot
        of each row on the host, read by a step of several memories to group the rows by memory."""
        if not self.multi:
            return self.pair.slot_forward(self.caches, tokens, positions, rows, length, slots, last, packing)
        pair = self.pair
        base_logits, hidden = pair.base.slot_forward(tokens, positions, self.caches[0], rows, length, slots, last,
                                                     packing)
        base_logits = base_logits[..., : pair.vocab]  # [B, V]
        mem_logits = base_logits.clone()  # [B, V]; base-alone rows keep finite logits, which lmbda 0 ignores
        groups: dict[int, list[int]] = {}
        for i, slot in enumerate(slot_ids):
            groups.setdefault(self.slot_memory[slot], []).append(i)
        cache_rows = torch.arange(rows.start, rows.stop, device=self.device) if isinstance(rows, slice) else rows
        for m, members in sorted(groups.items()):
            if m < 0:
                continue
            p, idx = self.pairs[m], torch.tensor(members, device=self.device)  # idx [B_m]
            if p.is_mlp:
                out = p.memory(hidden.index_select(0, idx))
            else:
                out = p.memory.slot_forward(tokens[idx], positions[idx], self.memory_caches[m], cache_rows[idx], length,
                                            None if slots is None else slots[idx], None if last is None else last[idx],
                                            None if packing is None else packing.select(members))[0]
            mem_logits.index_copy_(0, idx, out[..., : pair.vocab].to(mem_logits.dtype))
        return base_logits, mem_logits

    def _run(self, rows: int, length: int) -> Logits:
        if not self.replay:
            return self._decode_body(rows, length)
        key = (rows, length)
        if key not in self.graphs:
            self._capture(rows, length)  # on failure replay is off from now on
            if not self.replay:
                return self._decode_body(rows, length)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _capture(self, rows: int, length: int) -> None:
        """Warm up once on the capture stream, undo the sampler's draw, capture; a failure turns replay off."""
        main = torch.cuda.current_stream(self.device)
        rng_state = self.rng.get_state()
        try:
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                # lazy initialisation (cuBLAS workspaces, kernel loading) must not happen under capture; the
                # warm-up's cache writes are the very ones the replay repeats
                self._decode_body(rows, length)
            main.wait_stream(self.stream)
            self.rng.set_state(rng_state)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.rng)
            with torch.cuda.graph(graph, pool=self.mempool, stream=self.stream):
                logits = self._decode_body(rows, length)
        except RuntimeError as err:  # CUDA errors and out-of-memory
            torch.cuda.set_stream(main)  # torch.cuda.graph leaves its stream current when capture_end raises
            main.wait_stream(self.stream)
            self.rng = torch.Generator(self.device)  # the old one may be stuck mid-capture
            self.rng.set_state(rng_state)
            self.replay = False
            self.graphs.clear()
            logger.warning("memdec_fast: CUDA-graph capture failed, decoding eagerly from now on: %s", err)
            return
        self.graphs[rows, length] = (graph, logits)


def _check_shared_base(named: Mapping[str, ModelPair]) -> None:
    """Pairs of one step must hold the very same base runner, and their MLP Memories read one base layer (a base
    forward taps one hidden state); the base then returns that layer's hidden state for all of them."""
    pairs = list(named.values())
    base = pairs[0].base
    taps = set()
    for name, p in named.items():
        if p.base is not base:
            raise ValueError(f"memory {name!r}: its base is another model than the first memory's; memories over "
                             "one base must share its runner (ModelPair.share_base loads them so)")
        if p.reference != pairs[0].reference:
            raise ValueError(f"memory {name!r}: reference={p.reference}, but the first memory has "
                             f"reference={pairs[0].reference}")
        if p.is_mlp:
            taps.add(p.memory.layer_position % base.num_layers)
            if len(taps) > 1:
                raise ValueError(f"memory {name!r}: its MLP Memory reads base block {p.memory.layer_position}, another "
                                 "MLP Memory of this step another block; MLP Memories over one base must read one block")
    base.hidden_layer = next(iter(taps)) if taps else None


def _cache_shape(runner) -> tuple:
    """What a lean runner's slot caches look like: runners with equal ones can share them."""
    model = runner.model
    return (len(model.attention_blocks()), model.kv_shape(1, 1), next(model.parameters()).dtype, runner.device)
