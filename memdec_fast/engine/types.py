"""What crosses the engine's boundary: per-request results and stream deltas (defined with the other output types
in :mod:`memdec_fast.generation.outputs`), and typed errors.

The HTTP server (memdec_fast.server) and the engine (memdec_fast.engine) meet
only here: the server never touches tensors, the engine never parses HTTP.
"""

from __future__ import annotations

from memdec_fast.generation.outputs import RequestOutput, StreamDelta

__all__ = ["EngineClosed", "EngineError", "EngineOverloaded", "InvalidArgument", "RequestFailed", "RequestOutput",
           "StreamDelta"]


class EngineError(Exception):
    """Base class of the engine's errors."""


class InvalidArgument(EngineError, ValueError):
    """One argument of a request is bad; the request was not accepted. HTTP 400.

    param: the argument's name in :meth:`Engine.submit` ("prompt", "max_new_tokens", "seed", "stop",
    "temperature", ...); detail: what is wrong with it, without the name.
    """

    def __init__(self, param: str, detail: str):
        super().__init__(f"{param}: {detail}")
        self.param, self.detail = param, detail


class EngineOverloaded(EngineError):
    """The waiting queue is full (max_queue); the request was not accepted. HTTP 429."""


class EngineClosed(EngineError):
    """The engine is shutting down, closed, or stopped by an internal error, and accepts no new requests. HTTP 503."""


class RequestFailed(EngineError):
    """The request failed while running (e.g. its row produced NaN logits); others are unaffected. HTTP 500."""
