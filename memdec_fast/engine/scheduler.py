"""Slot and queue bookkeeping of the engine: who waits, who holds which cache slot, what to prefill next.

No tensors here. The engine's loop thread calls everything except :meth:`Scheduler.add` and
:meth:`Scheduler.cancel`, which caller threads call under :attr:`Scheduler.cond`.

A request's life: waiting (FIFO queue) -> admitted into the lowest free slot -> prefill, in
chunks summed over all requests (oldest admission first) up to the step's prefill budget ->
decoding, one token per engine step -> released (finished, cancelled or failed), which frees its
slot for the next waiting request.

The prefill budget (:class:`PrefillBudget`): up to ``prefill_chunk`` prompt tokens per step. With
``prefill_steps`` set, while requests decode a step prefills only about as many prompt tokens as
cost that many decode steps, by the measured times of both, so that a new prompt delays the running
streams' next token by at most that much; a request still in prefill :data:`MAX_PREFILL_STEPS`
steps after admission gets the whole ``prefill_chunk`` (no prompt waits for ever behind cheaper
decode steps). It is off by default: on a CPU, where a step is compute-bound, smaller chunks lost
tokens/s, TTFT and even the p99 time between tokens (benchmarks/NOTES.md, "Engine speed").
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from memdec_fast.engine.types import EngineOverloaded, RequestOutput, StreamDelta
from memdec_fast.generation.outputs import Ending, Row
from memdec_fast.ops.params import Param


class Sink(Protocol):
    """Where a request's results go: a Future (submit/generate) or a stream."""

    def delta(self, d: StreamDelta) -> None: ...
    def finish(self, out: RequestOutput) -> None: ...
    def fail(self, err: Exception) -> None: ...


@dataclass(eq=False)
class Request:
    """One request's inputs and progress."""

    request_id: str
    prompt: list[int]
    params: dict[str, Param]  # lmbda, knn_temp, base_temp, temperature, top_k, top_p, min_p; checked
    rng: torch.Generator | None  # a seeded request's own generator, else None (the engine's shared one)
    ending: Ending  # max_new_tokens, stop ids and strings; track_text for streams and stop strings
    streaming: bool
    sink: Sink
    row: Row = field(default_factory=Row)
    slot: int | None = None
    computed: int = 0  # prompt tokens already in the cache
    sent_text: int = 0  # characters already streamed
    sent_tokens: int = 0  # tokens already streamed
    cancelled: bool = False
    memory: int = 0  # index of its memory in the engine's step (ModelStep.pairs), -1 for the base alone
    admitted_at: int = 0  # the engine step that admitted it

    @property
    def decoding(self) -> bool:
        return self.computed == len(self.prompt) and self.row.finish_reason is None

    @property
    def position(self) -> int:
        """Position (= cache slot) of the next token fed to the model: the last one generated, while decoding;
        else the next prompt token."""
        return self.computed + len(self.row.token_ids) - 1 if self.row.token_ids else self.computed


MIN_PREFILL = 16
"""Fewest prompt tokens a step prefills while requests decode (unless ``prefill_chunk`` is smaller)."""

MAX_PREFILL_STEPS = 8
"""A request still in prefill this many steps after its admission gets the whole ``prefill_chunk`` budget."""


class PrefillBudget:
    """Prompt tokens per engine step, from the measured cost of a prompt token and of a decode step.

    The engine reports each prefill (:meth:`prefilled`) and decode step (:meth:`decoded`) with its wall
    time; both costs are moving averages (weight :attr:`SMOOTHING` on the newest), so that a busy
    host's slower steps shrink the chunks as much as they slow the decoding.

    Example
    -------
    >>> budget = PrefillBudget(cap=512, steps=1.0)
    >>> budget.prefilled(tokens=100, seconds=0.5); budget.decoded(seconds=0.2)
    >>> budget.tokens(decoding=True), budget.tokens(decoding=False)
    (40, 512)
    """

    SMOOTHING = 0.25

    def __init__(self, cap: int, steps: float | None = None):
        self.cap, self.steps = cap, steps
        self.token_seconds: float | None = None  # one prompt token's share of a prefill forward
        self.step_seconds: float | None = None  # one decode step

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.SMOOTHING * (new - old)

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A prefill forward of `tokens` prompt tokens took `seconds`."""
        if tokens > 0:
            self.token_seconds = self._mix(self.token_seconds, seconds / tokens)

    def mixed(self, tokens: int, seconds: float) -> None:
        """A step that prefilled `tokens` prompt tokens beside its decode rows, in one forward, took `seconds`: the
        prompt tokens cost what it took beyond a decode step."""
        if tokens > 0 and self.step_seconds is not None:
            self.token_seconds = self._mix(self.token_seconds, max(seconds - self.step_seconds, 0.0) / tokens)

    def decoded(self, seconds: float) -> None:
        """A decode step took `seconds`."""
        self.step_seconds = self._mix(self.step_seconds, seconds)

    def tokens(self, decoding: bool) -> int:
        """The budget of the next step: prompt tokens costing about ``steps`` decode steps while rows decode (at
        least :data:`MIN_PREFILL`, at most ``cap``); ``cap`` when ``steps`` is None, when nothing decodes, or before
        both costs are measured."""
        if self.steps is None or not decoding or self.token_seconds is None or self.step_seconds is None:
            return self.cap
        fit = round(self.steps * self.step_seconds / max(self.token_seconds, 1e-9))
        return min(self.cap, max(MIN_PREFILL, fit))


class Scheduler:
    """FIFO queue, ``max_batch`` cache slots, and the chunked-prefill plan.

    Parameters
    ----------
    max_batch : int, cache slots (requests running at once)
    max_queue : int, requests allowed to wait for a slot; one more raises EngineOverloaded
    prefill_chunk : int, the most prompt tokens prefilled per engine step, summed over requests
    prefill_steps : float, optional; while requests decode, prefill about this many decode steps' worth per step
    """

    def __init__(self, max_batch: int, max_queue: int, prefill_chunk: int, prefill_steps: float | None = None):
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.slots: list[Request | None] = [None] * max_batch
        self.admitted: list[Request] = []  # running requests in admission order (prefill goes oldest first)
        self.budget = PrefillBudget(prefill_chunk, prefill_steps)
        self.step = 0  # engine steps planned so far
        self.step_budget = prefill_chunk  # prompt tokens the last plan allowed

    # -- caller threads, under self.cond ----------------------------------------------------------

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_queue:
            raise EngineOverloaded(f"{len(self.waiting)} requests are already waiting (max_queue={self.max_queue})")
        self.waiting.append(req)

    def cancel(self, req: Request) -> bool:
        """Flag `req` cancelled; True when it was still waiting (it is dropped from the queue at once)."""
        req.cancelled = True
        try:
            self.waiting.remove(req)
        except ValueError:
            return False
        return True

    # -- the loop thread --------------------------------------------------------------------------

    @property
    def running(self) -> list[Request]:
        return list(self.admitted)

    def has_work(self) -> bool:
        return bool(self.waiting or self.admitted)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots (lowest first); call under self.cond."""
        new = []
        while self.waiting and len(self.admitted) < self.max_batch:
            req = self.waiting.popleft()
            req.slot = self.slots.index(None)
            req.admitted_at = self.step
            self.slots[req.slot] = req
            self.admitted.append(req)
            new.append(req)
        return new

    def release(self, req: Request) -> None:
        """Free `req`'s slot."""
        if req.slot is not None:
            self.slots[req.slot] = None
            self.admitted.remove(req)
            req.slot = None

    def prefill_plan(self) -> list[tuple[Request, int, int]]:
        """(request, start, end): prompt tokens [start, end) to prefill this step, within the step's budget
        (:class:`PrefillBudget`; at most prefill_chunk in all). Counts the step."""
        self.step += 1
        waiting = [r for r in self.admitted if r.computed < len(r.prompt)]
        starved = any(self.step - r.admitted_at > MAX_PREFILL_STEPS for r in waiting)
        decoding = any(r.decoding and r.row.token_ids for r in self.admitted)
        budget = self.step_budget = self.budget.tokens(decoding and not starved)
        plan = []
        for req in waiting:
            if budget == 0:
                break
            end = min(len(req.prompt), req.computed + budget)
            plan.append((req, req.computed, end))
            budget -= end - req.computed
        return plan

    def decode_rows(self) -> list[Request]:
        """Requests that decode this step."""
        return [r for r in self.admitted if r.decoding and r.row.token_ids]
