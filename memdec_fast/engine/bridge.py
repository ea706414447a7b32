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


class StreamChannel:
    """The engine's end of a stream: a thread-safe queue of deltas, read by one :class:`RequestStream`.

    It holds no reference to its reader, so dropping the reader cancels the request.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: deque = deque()  # StreamDelta, an exception, or _END
        self.waiter: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _push(self, item: object) -> None:
        with self.lock:
            self.items.append(item)
            waiter, loop, self.waiter = self.waiter, self.loop, None
        if waiter is not None:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the reader's loop is closed: nobody is listening
                pass

    def delta(self, d: StreamDelta) -> None:
        self._push(d)

    def finish(self, out: RequestOutput) -> None:
        self._push(_END)

    def fail(self, err: Exception) -> None:
        self._push(err)


class RequestStream:
    """An async iterator of one request's :class:`StreamDelta`; the last one carries finish_reason.

    Filled by the engine's thread, read on any event loop. Closing it before the end (``aclose()``,
    dropping it, e.g. by ``break`` out of ``async for engine.stream(...)``, or cancelling the task
    that awaits it) cancels the request. A failed request raises its error (e.g. RequestFailed).
    """

    def __init__(self, channel: StreamChannel, on_close: Callable[[], None]) -> None:
        self._channel, self._on_close = channel, on_close
        self._over = False  # the reader saw the end, or closed the stream

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        ch = self._channel
        while True:
            with ch.lock:
                if self._over:
                    raise StopAsyncIteration
                item = ch.items.popleft() if ch.items else None
                if item is None:
                    ch.loop = asyncio.get_running_loop()
                    ch.waiter = waiter = ch.loop.create_future()
            if item is None:
                try:
                    await waiter
                except asyncio.CancelledError:
                    self._close()
                    raise
                continue
            if isinstance(item, StreamDelta):
                return item
            self._over = True
            if item is _END:
                raise StopAsyncIteration
            raise item

    def _close(self) -> None:
        if not self._over:
            self._over = True
            self._on_close()

    async def aclose(self) -> None:
        """Stop reading; cancels the request unless it already ended."""
        self._close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown the engine may be gone
            self._close()
