"""Slot and queue bookkeeping of the engine: who waits, who holds which cache slot, what to prefill next.

No tensors here. The engine's loop thread calls everything except :meth:`Scheduler.add` and
:meth:`Scheduler.cancel`, which caller threads call under :attr:`Scheduler.cond`.

A request's life: waiting (FIFO queue) -> admitted into the lowest free slot -> prefill, in
chunks of at most ``prefill_chunk`` prompt tokens per engine step summed over all requests
(oldest admission first) -> decoding, one token per engine step -> released (finished,
cancelled or failed), which frees its slot for the next waiting request.
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

    @property
    def decoding(self) -> bool:
        return self.computed == len(self.prompt) and self.row.finish_reason is None

    @property
    def position(self) -> int:
        """Position (= cache slot) of the next token fed to the model: the last one generated, while decoding;
        else the next prompt token."""
        return self.computed + len(self.row.token_ids) - 1 if self.row.token_ids else self.computed


class Scheduler:
    """FIFO queue, ``max_batch`` cache slots, and the chunked-prefill plan.

    Parameters
    ----------
    max_batch : int, cache slots (requests running at once)
    max_queue : int, requests allowed to wait for a slot; one more raises EngineOverloaded
    prefill_chunk : int, prompt tokens prefilled per engine step, summed over requests
    """

    def __init__(self, max_batch: int, max_queue: int, prefill_chunk: int):
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.slots: list[Request | None] = [None] * max_batch
        self.admitted: list[Request] = []  # running requests in admission order (prefill goes oldest first)

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
        """(request, start, end): prompt tokens [start, end) to prefill this step, at most prefill_chunk in all."""
        budget, plan = self.prefill_chunk, []
        for req in self.admitted:
            if budget == 0:
                break
            if req.computed < len(req.prompt):
                end = min(len(req.prompt), req.computed + budget)
                plan.append((req, req.computed, end))
                budget -= end - req.computed
        return plan

    def decode_rows(self) -> list[Request]:
        """Requests that decode this step."""
        return [r for r in self.admitted if r.decoding and r.row.token_ids]
