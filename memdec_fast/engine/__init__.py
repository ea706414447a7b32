"""The serving engine: continuous batching of many requests over one base and its memory.

:class:`Engine` owns the models and its loop thread; what crosses its boundary (results,
stream deltas, typed errors) lives in :mod:`memdec_fast.engine.types`.
"""

from memdec_fast.engine.engine import Engine
from memdec_fast.engine.types import (
    EngineClosed,
    EngineError,
    EngineOverloaded,
    InvalidArgument,
    RequestFailed,
    RequestOutput,
    StreamDelta,
)

__all__ = ["Engine", "EngineClosed", "EngineError", "EngineOverloaded", "InvalidArgument",
           "RequestFailed", "RequestOutput", "StreamDelta"]
