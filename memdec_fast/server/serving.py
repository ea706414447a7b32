"""Turn one /v1/completions request into engine streams, and their deltas into OpenAI responses.

Every prompt of a request becomes one engine request, consumed through
``engine.stream`` even when the client did not ask to stream, so that time to
first token and time between tokens are measured the same way for both. Engine
errors become :class:`ApiError` (an HTTP status and OpenAI's error fields);
nothing here touches tensors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from memdec_fast.engine.types import EngineClosed, EngineOverloaded, InvalidArgument, RequestFailed, StreamDelta
from memdec_fast.generation.outputs import Row
from memdec_fast.server.metrics import ServerMetrics
from memdec_fast.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    Logprobs,
    Usage,
)

logger = logging.getLogger("memdec_fast.server")

_FINISH = {"length": "length", "stop": "stop", "eos": "stop"}  # the engine's reasons -> OpenAI's
_ENGINE_TO_HTTP = {"max_new_tokens": "max_tokens"}  # the engine's argument names that differ from OpenAI's


class ApiError(Exception):
    """An error to answer with: HTTP status plus OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.counted = False  # set once the request's outcome is in the metrics
        self.memory = ""  # the metrics' memory label, once the request's model is known

    def body(self) -> dict:
        return ErrorResponse(error=self.info).model_dump()


def bad_request(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def api_error(err: BaseException, prompt_index: int | None = None, log: bool = True) -> ApiError:
    """The HTTP answer to an exception raised by the engine (never its traceback).

    prompt_index: which prompt of a batch the engine request was, to name it in "prompt[i]: ...".
    log: log an unexpected exception (once: where the answer is sent)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, InvalidArgument):
        param = _ENGINE_TO_HTTP.get(err.param, err.param)
        where = f"{param}[{prompt_index}]" if param == "prompt" and prompt_index is not None else param
        detail = _one_line_text(err.detail).replace("max_new_tokens", "max_tokens")  # the engine's name -> OpenAI's
        return bad_request(f"{where}: {detail}", param)
    if isinstance(err, EngineOverloaded):
        return ApiError(429, f"the server is overloaded, retry later ({_one_line(err) or 'queue full'})",
                        "rate_limit_error", code="engine_overloaded")
    if isinstance(err, EngineClosed):
        return ApiError(503, "the server is shutting down and accepts no new requests", "service_unavailable_error",
                        code="engine_closed")
    if isinstance(err, RequestFailed):
        return ApiError(500, f"the request failed while generating: {_one_line(err) or 'no detail'}", "server_error",
                        code="request_failed")
    if isinstance(err, ValueError):  # an engine that does not name the argument
        return bad_request(_one_line(err), None)
    if log:
        logger.error("internal error", exc_info=err)
    return ApiError(500, "internal server error", "server_error", code="internal_error")


def _one_line(err: BaseException) -> str:
    return _one_line_text(str(err))


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


_OUTCOMES = {400: "bad_request", 404: "bad_request", 413: "bad_request", 415: "bad_request", 429: "overloaded",
             503: "unavailable"}


def outcome_of(err: BaseException) -> str:
    """The metrics outcome of a request that ended with `err`."""
    return _OUTCOMES.get(api_error(err, log=False).status if isinstance(err, Exception) else 500, "failed")


@dataclass
class _Choice(Row):
    """One prompt's output so far, assembled from its stream deltas, with what the response adds to a Row."""

    prompt_tokens: int = 0
    offset: int = 0  # text_offset of the next token


def served_models(engine, model_name: str) -> dict[str, tuple[dict, str]]:
    """The model ids a server answers to: {id: (the engine's `memory` argument, the metrics' memory label)}.

    An engine of one unnamed memory serves `model_name` alone (the pair, as always). An engine of named
    memories serves `model_name` for the base alone and ``<model_name>:<memory>`` for each memory.

    Example
    -------
    >>> list(served_models(engine, "memdec-fast"))  # Engine.from_pretrained(base, memories={"bio": ..., "law": ...})
    ['memdec-fast', 'memdec-fast:bio', 'memdec-fast:law']
    """
    names = list(getattr(engine, "memories", None) or ())
    if not names:
        return {model_name: ({}, "default")}
    return {model_name: ({"memory": None}, "base")} | {f"{model_name}:{n}": ({"memory": n}, n) for n in names}


class CompletionServing:
    """The /v1/completions logic over an engine (see :mod:`memdec_fast.engine`).

    Parameters
    ----------
    engine : has stream(prompt, **sampling), tokenizer, num_waiting, num_running, max_context, and
        optionally memories ({name: ...}: the named memories, each served as its own model id; see
        :func:`served_models`)
    model_name : the name clients must send as `model` (for the base alone, when the engine has named memories)
    metrics : ServerMetrics, default a new one reading the engine's gauges

    Example
    -------
    >>> serving = CompletionServing(engine, "memdec-fast")
    >>> result = await serving.create(CompletionRequest(model="memdec-fast", prompt="Hi"))  # a CompletionResponse
    """

    def __init__(self, engine, model_name: str, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.model_name = model_name
        self.models = served_models(engine, model_name)
        self.metrics = metrics or ServerMetrics(lambda: {"waiting": engine.num_waiting, "running": engine.num_running},
                                                [label for _, label in self.models.values()])
        self._pumps: set[asyncio.Task] = set()

    async def create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """A finished response, or (stream=true) an iterator of SSE events ending with ``data: [DONE]``.

        Raises ApiError for what is wrong before any token is produced (unknown
        model, bad field, queue full, shutting down, a failure while generating
        a non-streamed response).
        """
        t0 = time.perf_counter()
        if req.model not in self.models:
            served = ", ".join(repr(m) for m in self.models)
            raise ApiError(404, f"model: {req.model!r} is not served here; this server serves {served}",
                           "invalid_request_error", "model", "model_not_found")
        memory, label = self.models[req.model]
        cid = f"cmpl-{uuid.uuid4().hex}"
        try:
            streams = await self._open(req, cid, memory, label)  # may raise ApiError; nothing is left running then
        except ApiError as err:
            err.memory = label
            raise
        if req.stream:
            # the pumps start with the body: a body never sent drops the streams, and the engine cancels them
            return self._sse(req, cid, streams, t0, label)
        return await self._collect(req, cid, streams, t0, label)

    def _start(self, streams: list, t0: float, label: str) -> tuple[list[asyncio.Task], asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        return [self._spawn(self._pump(i, s, t0, queue, label)) for i, s in enumerate(streams)], queue

    # -- engine side ----------------------------------------------------------------------------

    async def _open(self, req: CompletionRequest, cid: str, memory: dict, label: str) -> list:
        """One engine stream per prompt. Prompts are checked and tokenised in a worker thread: a long one
        delays neither the event loop nor anyone else's request."""
        prompts, sampling = req.prompts(), req.sampling()
        most = getattr(self.engine, "max_batch", 0) + getattr(self.engine, "max_queue", 0)
        if most and len(prompts) > most:
            raise bad_request(f"prompt: {len(prompts)} prompts in one request; this server runs at most {most} "
                              f"(--max-batch + --max-queue)", "prompt")
        streams: list = []

        def open_all() -> None:
            for i, prompt in enumerate(prompts):
                try:
                    streams.append(self.engine.stream(prompt, request_id=f"{cid}-{i}", **sampling, **memory))
                except Exception as err:  # noqa: BLE001 (api_error maps it; unknown ones become a 500 and a log line)
                    raise api_error(err, i if len(prompts) > 1 else None) from None

        try:
            await asyncio.to_thread(open_all)
        except BaseException:
            for s in streams:
                self._spawn(_aclose(s))
                self.metrics.request_done("cancelled", memory=label)
            raise
        return streams

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._pumps.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._pumps.discard)
        return task

    async def _pump(self, index: int, stream: AsyncIterator[StreamDelta], t0: float, queue: asyncio.Queue,
                    label: str) -> None:
        """Move one engine stream's deltas to `queue` as (index, delta); then (index, None) or (index, error).

        Records the request's metrics. Cancelling this task cancels the engine
        request (its stream is closed), and counts it as cancelled.
        """
        outcome, prompt_tokens, tokens, last = "cancelled", 0, 0, None
        try:
            async for delta in stream:
                now = time.perf_counter()
                prompt_tokens = delta.prompt_tokens or prompt_tokens
                if delta.token_ids:
                    if last is None:
                        self.metrics.first_token(now - t0, label)
                    else:
                        self.metrics.between_tokens(now - last, len(delta.token_ids), label)
                    last, tokens = now, tokens + len(delta.token_ids)
                if delta.finish_reason is not None:
                    outcome = "success"
                queue.put_nowait((index, delta))
            queue.put_nowait((index, None))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 (handed to the response, which maps it)
            outcome = outcome_of(err)
            queue.put_nowait((index, err))
        finally:
            await _aclose(stream)
            e2e = time.perf_counter() - t0 if outcome == "success" else None
            self.metrics.request_done(outcome, prompt_tokens, tokens, e2e, label)

    # -- HTTP side ------------------------------------------------------------------------------

    def _apply(self, req: CompletionRequest, choice: _Choice, delta: StreamDelta) -> Logprobs | None:
        """Add `delta` to `choice`; returns the delta's logprobs object when the request asked for logprobs."""
        choice.text += delta.text
        choice.token_ids += delta.token_ids
        choice.logprobs += delta.logprobs
        choice.prompt_tokens = delta.prompt_tokens or choice.prompt_tokens
        if delta.finish_reason is not None:
            choice.finish_reason = _FINISH.get(delta.finish_reason, "stop")
        if req.logprobs is None:
            return None
        lp = Logprobs(top_logprobs=[] if req.logprobs else None)
        # a token's text is what it added to the response's text, so that tokens and offsets agree with `text`:
        # the engine sends one token per delta, and a token that ends a character split over several, or a
        # stop string's prefix held back, carries the held text
        for j, p in enumerate(delta.logprobs):
            piece = delta.text if j == 0 else ""
            lp.tokens.append(piece)
            lp.token_logprobs.append(p)
            lp.text_offset.append(choice.offset)
            choice.offset += len(piece)
        return lp

    async def _collect(self, req: CompletionRequest, cid: str, streams: list, t0: float,
                       label: str) -> CompletionResponse:
        tasks, queue = self._start(streams, t0, label)
        choices = [_Choice() for _ in tasks]
        lps: list[list[Logprobs]] = [[] for _ in tasks]
        pending = len(tasks)
        try:
            while pending:
                i, item = await queue.get()
                if item is None:
                    pending -= 1
                elif isinstance(item, BaseException):
                    err = api_error(item)
                    err.counted = True  # its pump counted it
                    raise err
                else:
                    lp = self._apply(req, choices[i], item)
                    if lp is not None:
                        lps[i].append(lp)
        finally:
            for t in tasks:  # no-op for finished pumps; frees the engine slots of the others
                t.cancel()
        out = []
        for i, c in enumerate(choices):
            logprobs = None
            if req.logprobs is not None:
                logprobs = Logprobs(top_logprobs=[] if req.logprobs else None)
                for lp in lps[i]:
                    logprobs.tokens += lp.tokens
                    logprobs.token_logprobs += lp.token_logprobs
                    logprobs.text_offset += lp.text_offset
            out.append(CompletionChoice(index=i, text=c.text, logprobs=logprobs,
                                        finish_reason=c.finish_reason))
        return CompletionResponse(id=cid, model=req.model, choices=out, usage=_usage(choices))

    async def _sse(self, req: CompletionRequest, cid: str, streams: list, t0: float,
                   label: str) -> AsyncIterator[str]:
        tasks, queue = self._start(streams, t0, label)
        del streams  # the pumps own them now
        choices = [_Choice() for _ in tasks]
        created = int(time.time())
        pending = len(tasks)

        def event(choice_list: list[CompletionChoice], usage: Usage | None = None) -> str:
            chunk = CompletionResponse(id=cid, created=created, model=req.model, choices=choice_list,
                                       usage=usage)
            return f"data: {chunk.model_dump_json(exclude=None if usage else {'usage'})}\n\n"

        try:
            while pending:
                i, item = await queue.get()
                if item is None:
                    pending -= 1
                    continue
                if isinstance(item, BaseException):
                    yield f"data: {json.dumps(api_error(item).body())}\n\n"
                    break
                lp = self._apply(req, choices[i], item)
                if item.text or item.finish_reason is not None or (lp is not None and lp.tokens):
                    finish = choices[i].finish_reason if item.finish_reason is not None else None
                    yield event([CompletionChoice(index=i, text=item.text, logprobs=lp, finish_reason=finish)])
            else:
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield event([], _usage(choices))
            yield "data: [DONE]\n\n"
        finally:
            # also on a client disconnect, where Starlette cancels this generator: cancel without awaiting
            for t in tasks:
                t.cancel()


def _usage(choices: list[_Choice]) -> Usage:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(len(c.token_ids) for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _aclose(stream) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # a stream that failed is closed already
            logger.debug("closing an engine stream", exc_info=True)
