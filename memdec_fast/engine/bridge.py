"""From the engine's loop thread to callers: a concurrent Future per request, or an async stream of deltas."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from memdec_fast.engine.types import RequestOutput, StreamDelta


def _settle(fn: Callable, value: object) -> None:
    try:
        fn(value)
    except InvalidStateError:  # the caller cancelled the future meanwhile
        pass


class FutureSink:
    """Results of a submit()/generate() request: only the final output, into a concurrent Future."""

    def __init__(self) -> None:
        self.future: Future[RequestOutput] = Future()

    def delta(self, d: StreamDelta) -> None:
        pass

    def finish(self, out: RequestOutput) -> None:
        _settle(self.future.set_result, out)

    def fail(self, err: Exception) -> None:
        _settle(self.future.set_exception, err)


_END = object()


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RequestStream:
    """An async iterator of one request's :class:`StreamDelta`; the last one carries finish_reason.

    Filled by the engine's thread, read on any event loop. Closing it before the end (``aclose()``,
    ``break`` out of ``async for`` once the iterator is dropped, or cancelling the task that awaits
    it) cancels the request. A failed request raises its error (e.g. RequestFailed) from ``__anext__``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque = deque()  # StreamDelta, an exception, or _END
        self._waiter: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._over = False  # the consumer saw the end, or closed the stream
        self.on_close: Callable[[], None] = lambda: None  # cancels the request; set by the engine

    # -- the engine's side ------------------------------------------------------------------------

    def _push(self, item: object) -> None:
        with self._lock:
            self._items.append(item)
            waiter, loop, self._waiter = self._waiter, self._loop, None
        if waiter is not None:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def delta(self, d: StreamDelta) -> None:
        self._push(d)

    def finish(self, out: RequestOutput) -> None:
        self._push(_END)

    def fail(self, err: Exception) -> None:
        self._push(err)

    # -- the consumer's side ----------------------------------------------------------------------

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        while True:
            with self._lock:
                if self._over:
                    raise StopAsyncIteration
                item = self._items.popleft() if self._items else None
                if item is None:
                    self._loop = asyncio.get_running_loop()
                    self._waiter = waiter = self._loop.create_future()
            if item is None:
                try:
                    await waiter
                except asyncio.CancelledError:
                    self._close()
                    raise
                continue
            if isinstance(item, StreamDelta):
                return item
            with self._lock:
                self._over = True
            if item is _END:
                raise StopAsyncIteration
            raise item

    def _close(self) -> None:
        with self._lock:
            if self._over:
                return
            self._over = True
        self.on_close()

    async def aclose(self) -> None:
        """Stop reading; cancels the request unless it already ended."""
        self._close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown the engine may be gone
            self._close()
