"""The OpenAI completions protocol as pydantic models: what the server reads and writes.

Only /v1/completions is served. Fields OpenAI defines but we do not support are
accepted at their neutral values and rejected otherwise (400 naming the field);
unknown fields are ignored, as OpenAI and vLLM do.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from memdec_fast.generation.requests import MAX_SEED, MAX_STOP_IDS, MAX_STOP_LENGTH, MAX_STOP_STRINGS
from memdec_fast.ops.params import FLOAT32_MAX

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; send temperature=0 for greedy decoding
MAX_LOGPROBS = 5  # OpenAI's limit on `logprobs`
INT64_MAX = 2**63 - 1

TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]

# Strict: JSON true is not the number 1, "yes" is not a bool, and numbers beyond what the kernels take (float32
# temperatures, int64 ids) or not numbers at all (NaN, Infinity) are refused here, naming the field.
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions.

    Beyond OpenAI's fields, as vLLM accepts them: top_k (0 or -1 disable), min_p,
    stop_token_ids, and lmbda (this request's weight of the memory, default the
    server's).
    """

    model_config = _STRICT

    model: str
    prompt: Prompt
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=INT64_MAX)
    temperature: float | None = Field(default=DEFAULT_TEMPERATURE, ge=0.0, le=FLOAT32_MAX)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=-INT64_MAX, le=INT64_MAX)
    best_of: int | None = Field(default=None, ge=-INT64_MAX, le=INT64_MAX)
    echo: bool | None = False
    suffix: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(default=None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_IDS)] | None = None
    lmbda: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("expected a non-empty string, list of strings, or list of token ids")
        return v

    @field_validator("n", "best_of")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError(f"only 1 is supported, got {v}")
        return v

    @field_validator("echo", "suffix", "logit_bias")
    @classmethod
    def _unsupported(cls, v, info: ValidationInfo):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (only 0)")
        return v

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch of prompts: one string, a list of strings, token ids, or lists of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]  # one prompt given as token ids
        return p

    def sampling(self) -> dict:
        """Keyword arguments for engine.stream (the engine's names and defaults for what is left unset)."""
        stop: list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        stop += list(self.stop_token_ids or [])
        kw = {
            "max_new_tokens": DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": 0 if self.top_k in (None, -1) else self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "seed": self.seed,
            "stop": stop or None,
        }
        if self.lmbda is not None:
            kw["lmbda"] = self.lmbda
        return kw


class Logprobs(BaseModel):
    """OpenAI's legacy logprobs object. top_logprobs is None: the engine returns the chosen token's log p only."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


FinishReason = Literal["stop", "length"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: FinishReason = None


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "memdec-fast"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
