"""torch.cuda's streams, events and graphs replaced by recorders, so that CUDA-graph capture code runs on the CPU.

No substitute for a GPU: it runs the Python logic around a capture (the warm-up, the undoing of its effects, the
generator registration, the failure fallback) that otherwise runs on no CPU machine. The model it keeps of a
graph is the part that logic depends on:

- under capture nothing runs: a call of the function marked with :meth:`FakeCuda.capture_calls_of` is recorded
  instead, and returns placeholders for its outputs (static tensors that only a replay fills);
- a replay calls each recorded function again, on the same buffers, and copies its outputs into the placeholders;
- a capture can be made to fail at its end, as ``capture_end`` fails on a GPU (an illegal sync, out of memory);
  like ``torch.cuda.graph`` then, it leaves the capture stream current.

Stream waits and events do nothing but log themselves: the CPU runs every operation in order anyway.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch

__all__ = ["FakeCuda"]


class FakeStream:
    def __init__(self, fake: FakeCuda, name: str):
        self.fake, self.name = fake, name

    def wait_stream(self, other: FakeStream) -> None:
        self.fake.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event: FakeEvent) -> None:
        self.fake.log.append(("wait_event", self.name, event.stream))

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeEvent:
    def __init__(self, fake: FakeCuda, *args, **kwargs):
        self.fake, self.stream = fake, None

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = (stream or self.fake.current).name
        self.fake.log.append(("record", self.stream))

    def synchronize(self) -> None:
        pass


class FakeGraph:
    """A captured graph: the calls recorded under capture, and the generators registered with it."""

    def __init__(self, fake: FakeCuda):
        self.fake = fake
        self.calls: list[tuple[Callable, tuple, dict, object]] = []
        self.generators: list[torch.Generator] = []
        self.replays = 0

    def register_generator_state(self, generator: torch.Generator) -> None:
        self.generators.append(generator)

    def replay(self) -> None:
        assert self.fake.capturing is None, "replay under capture"
        self.replays += 1
        for fn, args, kwargs, outs in self.calls:
            result = fn(*args, **kwargs)
            if outs is not None:
                for out, value in zip(outs, result, strict=True):
                    out.copy_(value)


class FakeCuda:
    """Installs the recorders over torch.cuda with `monkeypatch`.

    Parameters
    ----------
    monkeypatch : pytest's fixture (everything is undone after the test)
    fail_captures : the captures (1 for the first) whose end raises RuntimeError

    Attributes
    ----------
    log : what the streams, events and captures did, in order
    graphs : every graph made, in order
    current : the current stream
    """

    def __init__(self, monkeypatch, fail_captures: Iterable[int] = ()):
        self.monkeypatch, self.fail_captures = monkeypatch, set(fail_captures)
        self.log: list[tuple] = []
        self.graphs: list[FakeGraph] = []
        self.captures = 0
        self.capturing: FakeGraph | None = None
        self._names = itertools.count()
        self.default = FakeStream(self, "default")
        self.current = self.default
        cuda = torch.cuda
        for name, value in {
            "Stream": lambda *a, **k: FakeStream(self, f"stream{next(self._names)}"),
            "Event": lambda *a, **k: FakeEvent(self),
            "CUDAGraph": self._new_graph,
            "graph": self._graph,
            "stream": self._stream,
            "current_stream": lambda device=None: self.current,
            "default_stream": lambda device=None: self.default,
            "set_stream": self._set_stream,
            "graph_pool_handle": lambda: object(),
            "is_current_stream_capturing": lambda: self.capturing is not None,
        }.items():
            monkeypatch.setattr(cuda, name, value)
        # a tensor used on another stream than its own: only logged (the CPU runs everything in order)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: self.log.append(("record_stream",
                                                                                               stream.name)))

    def capture_calls_of(self, cls: type, method: str, placeholders: Callable | None = None) -> None:
        """Under capture, record calls of cls.method instead of running them (the graph's body).

        placeholders(self, *args) gives the tensors the call returns under capture, which each replay fills
        with what the call returns then; None for a method that returns nothing.
        """
        run = getattr(cls, method)
        fake = self

        def under_capture(obj, *args, **kwargs):
            if fake.capturing is None:
                return run(obj, *args, **kwargs)
            outs = None if placeholders is None else placeholders(obj, *args, **kwargs)
            fake.capturing.calls.append((run, (obj, *args), kwargs, outs))
            fake.log.append(("captured", method))
            return outs

        self.monkeypatch.setattr(cls, method, under_capture)

    # -- the patched torch.cuda functions ------------------------------------------------------------

    def _new_graph(self, *args, **kwargs) -> FakeGraph:
        graph = FakeGraph(self)
        self.graphs.append(graph)
        return graph

    def _set_stream(self, stream: FakeStream) -> None:
        self.log.append(("set_stream", stream.name))
        self.current = stream

    def _stream(self, stream: FakeStream | None):
        fake = self

        class _StreamContext:
            def __enter__(self):
                self.prev = fake.current
                if stream is not None:
                    fake.current = stream

            def __exit__(self, *exc):
                fake.current = self.prev
                return False

        return _StreamContext()

    def _graph(self, graph: FakeGraph, pool=None, stream: FakeStream | None = None, **kwargs):
        fake = self

        class _Capture:
            def __enter__(self):
                assert fake.capturing is None, "nested capture"
                fake.captures += 1
                self.prev = fake.current
                fake.current = stream if stream is not None else FakeStream(fake, "capture")
                fake.log.append(("capture_begin", fake.current.name))
                fake.capturing = graph

            def __exit__(self, exc_type, *exc):
                fake.capturing = None
                if exc_type is not None:
                    return False  # the body's error propagates; torch leaves the stream current then too
                if fake.captures in fake.fail_captures:
                    fake.log.append(("capture_failed", fake.current.name))
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing (simulated)")
                fake.log.append(("capture_end", fake.current.name))
                fake.current = self.prev
                return False

        return _Capture()
