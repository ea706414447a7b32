"""Engine: continuous batching of many requests over one base and its memory, or several memories.

One background thread owns the models and runs the loop; each iteration (an engine *step*):

1. drops cancelled requests (their slots free at once) and admits waiting ones into free slots;
2. prefills the requests still in prefill, oldest first, up to ``prefill_chunk`` prompt tokens (with
   ``prefill_steps``, while others decode, about as many as cost that many decode steps, measured:
   :class:`memdec_fast.engine.scheduler.PrefillBudget`). A long prompt is split over several steps,
   so running streams keep getting one token per step while it is read; a request whose prompt is
   complete samples its first token;
3. runs one decode step over every decoding request (see :mod:`memdec_fast.engine.step`), and
   retires the ones that finished. Where steps do not replay as CUDA graphs (the CPU), a step with
   both runs them in one forward, and a request whose prompt completes there decodes from the next step.

Callers reach it from any thread (:meth:`Engine.submit`) or event loop (:meth:`Engine.generate`,
:meth:`Engine.stream`); errors cross as the typed exceptions of :mod:`memdec_fast.engine.types`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future

import torch

from memdec_fast import ranges
from memdec_fast.engine.bridge import FutureSink, RequestStream, StreamChannel
from memdec_fast.engine.scheduler import Request, Scheduler, Sink
from memdec_fast.engine.step import ModelStep
from memdec_fast.engine.types import EngineClosed, InvalidArgument, RequestFailed, RequestOutput, StreamDelta
from memdec_fast.generation import requests
from memdec_fast.generation.outputs import Ending
from memdec_fast.models import checks
from memdec_fast.models.pair import ModelPair

__all__ = ["Engine"]


@contextlib.contextmanager
def _blame(param: str):
    """Turn a ValueError of the checks inside into InvalidArgument naming `param`."""
    try:
        yield
    except InvalidArgument:
        raise
    except ValueError as err:
        detail = str(err)
        head, sep, rest = detail.partition(": ")
        # the checks name what they check ("seed: ...", "prompts[0]: ..."): keep only what is wrong
        raise InvalidArgument(param, rest if sep and " " not in head else detail) from None

logger = logging.getLogger(__name__)

DEFAULT_MEMORY = "<default>"
"""A request's `memory` when it names none: the memory of an engine of one unnamed pair, else the base alone."""

SAMPLING = {"max_new_tokens": 32, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None,
            "stop": None, "lmbda": None, "request_id": None, "memory": DEFAULT_MEMORY}
"""The sampling keyword arguments of submit / generate / stream, and their defaults."""

PREFILL_CHUNK = 512
"""Default prompt tokens prefilled per engine step (summed over requests)."""

GATHER_BELOW = 0.75
"""An eager decode step runs its decoding rows alone (gathered) when they are at most this share of the rows it
would run otherwise (measured on the CPU, gpt2-small pair, 32 slots: gathered 24 of 32 took 148 ms against 163 ms
for all 32, 28 of 32 took 172 ms; benchmarks/NOTES.md, "Engine speed")."""


class Engine:
    """Continuous batching over a model pair (:class:`memdec_fast.models.pair.ModelPair`).

    Up to ``max_batch`` requests run at once, each in its own cache slot at its own length;
    up to ``max_queue`` more wait. A request's tokens do not depend on the others in the
    batch: greedy requests get JointGenerator's tokens for the same prompt alone, and seeded
    requests draw from their own generator, seeded as JointGenerator seeds it.

    Parameters
    ----------
    pair : ModelPair, anything holding one as ``.pair`` (a JointGenerator), or {name: ModelPair}
        Loaded models on memdec_fast's lean GPT-2 or Llama family (a lean Memory Decoder or an
        MLP Memory). The engine owns them from now on: do not generate with a JointGenerator over
        the same pair while the engine runs. A pair running in transformers raises ValueError.
        Named pairs are several memories over one base (they must share its runner, as
        :meth:`ModelPair.share_base` loads them): a request picks one with ``memory="name"``, or
        runs on the base alone (lmbda 0, no memory forward) when it names none; names are unique
        and URL-safe. With one unnamed pair, a request runs with that memory unless it passes
        ``memory=None`` (the base alone).
    max_batch : int
        Cache slots: requests decoding at once. The caches of all slots are allocated here
        (max_batch x context positions per model).
    max_queue : int
        Requests allowed to wait for a slot; one more raises EngineOverloaded.
    prefill_chunk : int
        The most prompt tokens prefilled per engine step, summed over requests: the most a step
        delays running streams for new prompts.
    prefill_steps : float, optional
        While requests decode, prefill only about as many prompt tokens per step as cost this many
        decode steps (measured as the engine runs; at least 16 tokens): a tighter bound on the time
        between tokens, at a cost in tokens/s and time to first token where steps are
        compute-bound (the CPU). None (default): up to ``prefill_chunk``.
    cuda_graphs : bool
        On CUDA, replay each decode step as a CUDA graph, one per (batch, length) bucket.
    max_context : int, optional
        Positions per slot, at most the models' context (the default). Llama-family models
        allow 32k-128k positions; a cap keeps max_batch x max_context caches in memory.

    Attributes
    ----------
    tokenizer : the base's tokenizer
    memories : {name: ModelPair}, the named memories ({} for one unnamed pair)
    max_context : int, positions a request may use (prompt + max_new_tokens - 1)
    max_batch, max_queue, prefill_chunk : int
    stats : dict of counters: steps, decode_steps, prefill_chunks, prefill_tokens, tokens

    Example
    -------
    >>> with Engine.from_pretrained("gpt2", "path/to/memory", max_batch=16) as engine:
    ...     out = engine.submit("The patient was given", max_new_tokens=20).result()
    ...     print(out.text, out.finish_reason)
    """

    def __init__(self, pair: ModelPair | Mapping[str, ModelPair], max_batch: int = 32, max_queue: int = 256,
                 prefill_chunk: int = PREFILL_CHUNK, cuda_graphs: bool = True, max_context: int | None = None,
                 prefill_steps: float | None = None):
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                                 ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if prefill_steps is not None:
            ranges.check("engine.prefill_steps", prefill_steps)
        if isinstance(pair, Mapping):
            checks.check_memory_names(list(pair))
            self.memories = dict(pair)
            step_pairs = self.memories
            pair = next(iter(self.memories.values()))
        else:
            pair = step_pairs = getattr(pair, "pair", pair)
            self.memories = {}
        self.pair, self.tokenizer, self.vocab, self.device = pair, pair.tokenizer, pair.vocab, pair.device
        self.max_context = min(p.max_context for p in self.memories.values()) if self.memories else pair.max_context
        if max_context is not None:
            if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
                raise ValueError(f"max_context: expected an int >= 2, got {max_context!r}")
            self.max_context = min(self.max_context, max_context)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self._step = ModelStep(step_pairs, self.max_context, max_batch, cuda_graphs=cuda_graphs)
        self._sched = Scheduler(max_batch, max_queue, prefill_chunk, prefill_steps)
        self._eos = self.tokenizer.eos_token_id
        self._tok_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        self._encoders = threading.local()  # per-thread tokenizer copies that encode requests (see _encoder)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = self._abort = False
        self.error: BaseException | None = None
        """What stopped the loop, when a bug did; the engine then refuses every request (see :attr:`healthy`)."""
        self.stats = {"steps": 0, "decode_steps": 0, "prefill_chunks": 0, "prefill_tokens": 0, "tokens": 0}
        self.trace: deque[dict] = deque(maxlen=4096)
        """Per engine step: {"prefill": [(request_id, start, end)], "decode": [request_id], "budget": prompt tokens
        the step could prefill} (recent steps only)."""

    @classmethod
    def from_pretrained(
        cls, base: str | os.PathLike, memory: str | os.PathLike | None = None, *,
        memories: Mapping[str, str | os.PathLike | Mapping] | None = None, cuda_graphs: bool = True,
        max_batch: int = 32, max_queue: int = 256, prefill_chunk: int = PREFILL_CHUNK, max_context: int | None = None,
        prefill_steps: float | None = None, **load,
    ) -> Engine:
        """Load a base and its memory (or several named memories over it) and wrap them in an Engine.

        Parameters
        ----------
        base, memory : str or PathLike, checkpoints on memdec_fast's lean models
        memories : {name: path or {"path", "memory_type", "lmbda", "knn_temp"}}, instead of `memory`
            Several memories over one base, loaded once (see :meth:`ModelPair.share_base`): requests
            pick one by name. Each memory's lmbda and knn_temp default to its stored values.
        cuda_graphs, max_batch, max_queue, prefill_chunk, max_context, prefill_steps :
            As in :class:`Engine`.
        **load :
            memory_type, lmbda, knn_temp (default: the values stored with the memory), base_temp,
            device, dtype, tokenizer: see :meth:`memdec_fast.models.pair.ModelPair.from_pretrained`.

        Example
        -------
        >>> engine = Engine.from_pretrained("gpt2-xl", "path/to/memory", max_batch=32, max_queue=256)
        >>> engine = Engine.from_pretrained("gpt2-xl", memories={"bio": "path/to/bio", "law": "path/to/law"})
        """
        if (memory is None) == (memories is None):
            raise ValueError("memory, memories: pass one memory, or memories={name: path, ...}")
        pair = ModelPair.from_pretrained(base, memory, **load) if memories is None else ModelPair.share_base(
            base, memories, **load)
        return cls(pair, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                   cuda_graphs=cuda_graphs, max_context=max_context, prefill_steps=prefill_steps)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the decode loop's thread (the first request also starts it). Raises EngineClosed after close()."""
        with self._sched.cond:
            self._start_locked()

    def _start_locked(self) -> None:
        if self.error is not None:
            raise EngineClosed(f"the engine stopped after an internal error ({type(self.error).__name__})")
        if self._closing:
            raise EngineClosed("the engine is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="memdec_fast-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests; let running and waiting ones finish for up to `timeout` seconds (None: until
        they are done), then fail the rest with EngineClosed, and join the loop's thread. Idempotent."""
        with self._sched.cond:
            self._closing = True
            self._sched.cond.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._sched.cond:
                self._abort = True
                self._sched.cond.notify_all()
            thread.join()

    def __enter__(self) -> Engine:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def healthy(self) -> bool:
        """False once the loop has stopped for any reason but close(): every request would fail."""
        thread = self._thread
        return self.error is None and (thread is None or thread.is_alive() or self._closing)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._sched.waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._sched.admitted)

    # -- requests ---------------------------------------------------------------------------------

    def _request(self, prompt: str | Sequence[int], sampling: dict, sink: Sink) -> Request:
        """Check and encode one request; raise InvalidArgument (a ValueError naming the argument) or TypeError.

        Every value is brought here into the range the step takes, so that nothing a request sends can
        fail the batched step of the others.
        """
        unknown = sorted(set(sampling) - set(SAMPLING))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}")
        s = SAMPLING | sampling
        with _blame("prompt"):
            requests.check_one_prompt(prompt)
            ids = requests.encode_prompts(prompt, self._encoder(), self.vocab)[0]
        with _blame("stop"):
            stop_ids, stop_strings = requests.parse_stop(s["stop"], self._encoder(), self.vocab)
        with _blame("max_new_tokens"):
            requests.check_request(s["max_new_tokens"], None)
        with _blame("seed"):
            requests.check_request(1, s["seed"])
        try:
            requests.check_prompt_length(len(ids), s["max_new_tokens"], self.max_context)
        except ValueError as err:
            raise InvalidArgument("prompt", str(err).removeprefix("prompt ")) from None
        memory, pair = self._memory(s["memory"])
        if pair is None and s["lmbda"] not in (None, 0, 0.0):
            raise InvalidArgument("lmbda", f"the base alone (no memory) takes no lmbda, got {s['lmbda']!r}")
        values = {"lmbda": 0.0 if pair is None else pair.lmbda if s["lmbda"] is None else s["lmbda"],
                  "knn_temp": 1.0 if pair is None else pair.knn_temp, "base_temp": self.pair.base_temp,
                  **{k: s[k] for k in ("temperature", "top_k", "top_p", "min_p")}}
        params = {}
        for name, value in values.items():
            with _blame(name):
                params |= requests.sampling_params(1, torch.device("cpu"), **{name: value})
        # top_k >= vocab keeps every token: the same filter, in the int64 the kernels take
        params["top_k"] = min(params["top_k"], self.vocab) if isinstance(params["top_k"], int) else params["top_k"]
        params = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
        rid = s["request_id"]
        if rid is None:
            rid = f"req-{next(self._ids)}"
        elif not isinstance(rid, str):
            raise InvalidArgument("request_id", f"expected a str or None, got {rid!r}")
        rng = None if s["seed"] is None else self._step.new_rng(s["seed"])
        streaming = isinstance(sink, StreamChannel)
        ending = Ending(s["max_new_tokens"], frozenset(stop_ids), tuple(stop_strings), self._eos,
                        streaming or bool(stop_strings))
        return Request(rid, ids, params, rng, ending, streaming, sink, memory=memory)

    def _memory(self, name) -> tuple[int, ModelPair | None]:
        """A request's memory: (its index in the step, -1 for the base alone; its pair, None for the base alone)."""
        if name == DEFAULT_MEMORY:
            return (-1, None) if self.memories else (0, self.pair)
        if name is None:
            return -1, None
        if name in self.memories:
            return list(self.memories).index(name), self.memories[name]
        if not self.memories:
            raise InvalidArgument("memory", f"unknown memory {name!r}; this engine has one unnamed memory: omit "
                                            "memory to use it, or pass None for the base alone")
        served = ", ".join(repr(n) for n in self.memories)
        raise InvalidArgument("memory", f"unknown memory {name!r}; this engine serves the memories {served}, "
                                        "or None for the base alone")

    def _encoder(self):
        """This thread's copy of the tokenizer, for encoding requests: a long prompt encodes in its caller's
        thread and never holds the lock the loop decodes under."""
        tok = getattr(self._encoders, "tokenizer", None)
        if tok is None:
            with self._tok_lock:
                tok = self._encoders.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    def _enqueue(self, req: Request) -> None:
        with self._sched.cond:
            self._start_locked()
            self._sched.add(req)
            self._sched.cond.notify_all()

    def _cancel(self, req: Request) -> None:
        with self._sched.cond:
            self._sched.cancel(req)
            self._sched.cond.notify_all()

    def submit(self, prompt: str | Sequence[int], **sampling) -> Future[RequestOutput]:
        """Queue one request; thread-safe. ``Future.cancel()`` cancels it (its slot frees at the next step).

        Parameters
        ----------
        prompt : str or list of token ids
        max_new_tokens : int, default 32
        temperature, top_k, top_p, min_p : HF-style sampling of the mixture; temperature 0 (default) is greedy
        seed : int, optional; the same seed gives the same tokens as JointGenerator.generate alone
        stop : token id, string, or a list of them
        lmbda : float, optional; default the memory's
        memory : str or None, optional
            The named memory to mix with, or None for the base alone; default the memory of an
            engine of one unnamed pair, else the base alone.
        request_id : str, optional; default "req-<n>"

        Returns
        -------
        concurrent.futures.Future of a RequestOutput; it raises RequestFailed when the request's
        row produced NaN or infinite logits, EngineClosed when close() cancelled it.

        Raises
        ------
        ValueError, TypeError : bad arguments, an empty prompt, or a prompt too long for the context
        EngineOverloaded : max_queue requests are already waiting
        EngineClosed : after close()

        Example
        -------
        >>> fut = engine.submit("Hello", max_new_tokens=8, temperature=0.7, seed=0)
        >>> fut.result().text
        """
        sink = FutureSink()
        req = self._request(prompt, sampling, sink)
        self._enqueue(req)
        sink.future.add_done_callback(lambda f: self._cancel(req) if f.cancelled() else None)
        return sink.future

    async def generate(self, prompt: str | Sequence[int], **sampling) -> RequestOutput:
        """:meth:`submit`, awaited; cancelling the awaiting task cancels the request.

        Example
        -------
        >>> out = await engine.generate("Hello", max_new_tokens=8)
        """
        return await asyncio.wrap_future(self.submit(prompt, **sampling))

    def stream(self, prompt: str | Sequence[int], **sampling) -> RequestStream:
        """Queue one request and return an async iterator of its :class:`StreamDelta`.

        Arguments are checked, and the request queued, at the call (ValueError, EngineOverloaded and
        EngineClosed raise here); the deltas' texts join to the final text, pending UTF-8 and possible
        stop-string prefixes held back; the last delta has finish_reason set. Closing the iterator
        early (aclose, break, cancelling the task) cancels the request.

        Example
        -------
        >>> async for delta in engine.stream("Once upon a time", max_new_tokens=50):
        ...     print(delta.text, end="", flush=True)
        """
        channel = StreamChannel()
        req = self._request(prompt, sampling, channel)
        self._enqueue(req)
        return RequestStream(channel, lambda: self._cancel(req))

    # -- the loop thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # a bug in the loop itself: refuse everything from now on
            logger.critical("memdec_fast engine: the loop stopped: %r", err, exc_info=err)
            with self._sched.cond:
                self.error = err
        with self._sched.cond:
            left = list(self._sched.waiting) + self._sched.running
            self._sched.waiting.clear()
        reason = ("the engine closed before the request finished" if self.error is None
                  else f"the engine stopped after an internal error ({type(self.error).__name__})")
        for req in left:
            self._release(req, written=None)
            req.sink.fail(EngineClosed(reason))

    def _serve(self) -> None:
        sched = self._sched
        while True:
            with sched.cond:
                while not self._abort and not sched.has_work() and not self._closing:
                    sched.cond.wait()
                if self._abort or (self._closing and not sched.has_work()):
                    return
                for req in [r for r in sched.admitted if r.cancelled]:
                    self._release(req)
                admitted = sched.admit()
            for req in admitted:
                try:
                    self._step.set_params(req.slot, req.params)
                    self._step.set_memory(req.slot, req.memory)
                except Exception as err:  # noqa: BLE001 - the request's own values: it fails alone
                    self._fail(req, self._failure(req, err))
            self._iteration()

    def _iteration(self) -> None:
        sched, step = self._sched, self._step
        plan = sched.prefill_plan()
        record = {"prefill": [], "decode": [], "budget": sched.step_budget}
        if not (plan and not step.replay and self._prefill_decode(plan, sched.decode_rows(), record)):
            self._prefill(plan, record)
            self._decode_step(sched.decode_rows(), record)
        self.stats["steps"] += 1
        self.trace.append(record)

    def _prefill(self, plan: list[tuple[Request, int, int]], record: dict) -> None:
        """Prefill the plan's chunks in one forward (each alone when that fails); a request whose prompt is
        complete samples its first token."""
        step, started = self._step, time.perf_counter()
        for (req, start, end), logits in self._isolated(
            plan, lambda part: step.prefill([(r.slot, r.prompt[a:b], a) for r, a, b in part])
        ):
            self._prefilled(req, start, end, record)
            if end == len(req.prompt):
                self._guard(req, lambda r=req, lg=logits: self._emit(r, *step.sample_one(lg, r.params, r.rng)))
        self._sched.budget.prefilled(sum(end - start for _, start, end in plan), time.perf_counter() - started)

    def _prefilled(self, req: Request, start: int, end: int, record: dict) -> None:
        self.stats["prefill_chunks"] += 1
        self.stats["prefill_tokens"] += end - start
        req.computed = end
        record["prefill"].append((req.request_id, start, end))

    def _decode_step(self, rows: list[Request], record: dict) -> None:
        """One decode step of `rows` (each alone when the batch fails), their tokens emitted."""
        if not rows:
            return
        step, started = self._step, time.perf_counter()
        try:
            out_tokens, out_logprobs = self._decode(rows)
        except Exception as err:  # noqa: BLE001 - find the row that fails: run each alone
            logger.warning("memdec_fast engine: a decode step of %d rows failed (%r); running them one by one",
                           len(rows), err)
            out = {}
            for r in rows:
                self._guard(r, lambda r=r: out.__setitem__(r.slot, step.decode_one(
                    r.slot, r.row.token_ids[-1], r.position, r.params, r.rng)))
            rows = [r for r in rows if r.slot in out]
            out_tokens, out_logprobs = ({r.slot: out[r.slot][i] for r in rows} for i in (0, 1))
        else:
            self._sched.budget.decoded(time.perf_counter() - started)
        self.stats["decode_steps"] += 1
        for r in rows:
            record["decode"].append(r.request_id)
            self._guard(r, lambda r=r: self._emit(r, out_tokens[r.slot], out_logprobs[r.slot]))

    def _prefill_decode(self, plan: list[tuple[Request, int, int]], rows: list[Request], record: dict) -> bool:
        """The plan's chunks and a decode step of `rows` in one eager forward (:meth:`ModelStep.prefill_decode`):
        the decoding rows and the requests whose prompt completes emit a token. False, with nothing changed,
        when there is nothing to decode or the forward fails (the caller then runs them apart, each failure
        isolated)."""
        if not rows:
            return False
        started = time.perf_counter()
        busy = [r for r in self._sched.admitted if r.slot is not None]
        tokens, positions = self._step_inputs(busy, rows, max(r.slot for r in busy) + 1)
        try:
            logits, toks, lps = self._step.prefill_decode([(r.slot, r.prompt[a:b], a) for r, a, b in plan], tokens,
                                                          positions)
        except Exception as err:  # noqa: BLE001 - run them apart, where a failure stays with its request
            logger.warning("memdec_fast engine: a step of %d prompt chunks and %d decode rows failed (%r); running "
                           "them apart", len(plan), len(rows), err)
            return False
        self._sched.budget.mixed(sum(end - start for _, start, end in plan), time.perf_counter() - started)
        for req, start, end in plan:
            self._prefilled(req, start, end, record)
        self.stats["decode_steps"] += 1
        record["decode"] = [r.request_id for r in rows]
        for r in rows + [req for req, _, end in plan if end == len(req.prompt)]:
            self._guard(r, lambda r=r: self._emit(r, *self._own_draw(r, logits, toks, lps, r.slot)))
        return True

    def _decode(self, rows: list[Request]) -> tuple[dict[int, int], dict[int, float]]:
        """One batched decode step of `rows`; each slot's token and log p.

        The step runs cache rows [0, n), n the bucket of the highest busy slot + 1, where rows that do not
        decode feed dummies; an eager step (no graphs) whose decoding rows are at most :data:`GATHER_BELOW` of
        those n runs the decoding rows alone, gathered by index (fewer rows computed, their caches copied)."""
        busy = [r for r in self._sched.admitted if r.slot is not None]
        n = self._step.bucket(max(r.slot for r in busy) + 1)
        if not self._step.replay and len(rows) <= GATHER_BELOW * n:
            logits, toks, lps = self._step.decode_rows([r.slot for r in rows], [r.row.token_ids[-1] for r in rows],
                                                       [r.position for r in rows])
            at = {r.slot: i for i, r in enumerate(rows)}  # the row of each slot in the step's outputs
        else:
            logits, toks, lps = self._step.decode(*self._step_inputs(busy, rows, n))
            at = {r.slot: r.slot for r in rows}
        draws = {r.slot: self._own_draw(r, logits, toks, lps, at[r.slot]) for r in rows}
        return {slot: d[0] for slot, d in draws.items()}, {slot: d[1] for slot, d in draws.items()}

    @staticmethod
    def _step_inputs(busy: list[Request], rows: list[Request], n: int) -> tuple[list[int], list[int]]:
        """Each of the step's rows [0, n): the token it feeds and its position. Decoding `rows` feed their last
        token; any other busy slot (a request in prefill) feeds a dummy token where its next chunk will write,
        and a free slot a dummy at position 0."""
        tokens, positions = [0] * n, [0] * n
        for r in busy:
            if r.slot < n:
                positions[r.slot] = r.position
        for r in rows:
            tokens[r.slot] = r.row.token_ids[-1]
        return tokens, positions

    def _own_draw(self, req: Request, logits, toks: list[int], lps: list[float], i: int) -> tuple[int, float]:
        """`req`'s token and log p from row i of a batched step's draws; a seeded request draws again from its own
        generator, as it would alone."""
        if req.rng is None:
            return toks[i], lps[i]
        return self._step.sample_one((logits[0][i : i + 1], logits[1][i : i + 1]), req.params, req.rng)

    def _isolated(self, plan: list, run) -> list:
        """[(item, logits of that item)] of run(plan); when the batch fails, each item runs alone and the ones
        that still fail fail their requests (the others go on)."""
        if not plan:
            return []
        try:
            base, mem = run(plan)
            return [(item, (base[i : i + 1], mem[i : i + 1])) for i, item in enumerate(plan)]
        except Exception as err:  # noqa: BLE001
            if len(plan) == 1:
                self._fail(plan[0][0], self._failure(plan[0][0], err))
                return []
            logger.warning("memdec_fast engine: a prefill of %d chunks failed (%r); running them one by one",
                           len(plan), err)
        return [done for item in plan for done in self._isolated([item], run)]

    def _guard(self, req: Request, work) -> None:
        """Run `work` for `req`; an exception fails `req` alone."""
        try:
            work()
        except Exception as err:  # noqa: BLE001
            self._fail(req, self._failure(req, err))

    @staticmethod
    def _failure(req: Request, err: Exception) -> RequestFailed:
        logger.error("memdec_fast engine: request %s failed", req.request_id, exc_info=err)
        # the message reaches the client: name the kind of error, not the op's internals
        return RequestFailed(f"request {req.request_id}: the engine step failed on this request "
                             f"({type(err).__name__})")

    def _emit(self, req: Request, token: int, logprob: float) -> None:
        """Append one sampled token to `req`, stream it, and retire the request when it is done."""
        row = req.row
        if req.cancelled:
            return  # released at the next step
        if token < 0:
            self._fail(req, RequestFailed(
                f"request {req.request_id}: the models produced NaN or infinite logits at token {len(row.token_ids)}"))
            return
        self.stats["tokens"] += 1
        with self._tok_lock:
            row.add(token, logprob, req.ending, self.tokenizer)
        if req.streaming:
            text = row.stable_text(req.ending.stop_strings)
            req.sink.delta(StreamDelta(
                req.request_id, text[req.sent_text:], row.token_ids[req.sent_tokens:], row.logprobs[req.sent_tokens:],
                row.finish_reason, len(req.prompt),
            ))
            req.sent_text, req.sent_tokens = max(req.sent_text, len(text)), len(row.token_ids)
        if row.finish_reason is not None:
            self._release(req)
            req.sink.finish(row.output(req.request_id, len(req.prompt)))

    def _fail(self, req: Request, err: Exception) -> None:
        self._release(req, written=None)
        req.sink.fail(err)

    def _release(self, req: Request, written: int | None = -1) -> None:
        """Free `req`'s slot, zeroing what it wrote: a masked cache slot still enters probs @ V, where a stale
        NaN would poison the next user (0 * NaN = NaN). written: positions [0, written) to zero; -1 for all
        the request fed; None for the whole slot (a failure may have written anywhere)."""
        if req.slot is not None:
            upto = None if written is None else req.position + 1 if written == -1 else written
            self._step.clear_slot(req.slot, upto)
            self._step.set_memory(req.slot, -1)  # a free slot in a step's rows runs no memory
        with self._sched.cond:
            self._sched.release(req)
