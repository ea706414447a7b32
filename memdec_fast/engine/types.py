"""What crosses the engine's boundary: per-request results, stream deltas, and typed errors.

The HTTP server (memdec_fast.server) and the engine (memdec_fast.engine) meet
only here: the server never touches tensors, the engine never parses HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One finished request.

    text: the completion, without special tokens, cut before a stop string.
    token_ids: every generated token, including the EOS or stop token that ended it.
    logprobs: log p of each token under the unfiltered mixture.
    finish_reason: "length", "stop" (a stop string or stop token id) or "eos" (the tokenizer's EOS).
    prompt_tokens: how many tokens the prompt encoded to.
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int


@dataclass
class StreamDelta:
    """What one request produced since its previous delta.

    text: new stable text (may be empty while a UTF-8 character or a stop string is pending).
    token_ids, logprobs: the new tokens and their log p.
    finish_reason: None until the last delta of the request.
    """

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0


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
