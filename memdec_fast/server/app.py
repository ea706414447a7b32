"""The HTTP app: routes, and every error as OpenAI's error JSON. The logic lives in :mod:`.serving`.

Routes: POST /v1/completions, GET /v1/models, GET /health, GET /metrics.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from memdec_fast.server import MAX_BODY_BYTES
from memdec_fast.server.metrics import ServerMetrics
from memdec_fast.server.protocol import CompletionRequest, ModelCard, ModelList
from memdec_fast.server.serving import ApiError, CompletionServing, api_error, bad_request, outcome_of

_STATUS_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error"}


def build_app(engine, model_name: str = "memdec-fast", metrics: ServerMetrics | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving `engine`; the caller starts and closes the engine.

    Set ``app.state.draining = True`` to answer new completions (and /health)
    with 503 while the requests in flight finish.

    Parameters
    ----------
    engine : memdec_fast.engine.Engine, or anything with its stream / tokenizer / num_waiting / num_running
    model_name : str, the `model` clients must send; with an engine of named memories, the id of the base
        alone, and ``<model_name>:<memory>`` picks a memory (see :func:`.serving.served_models`)
    metrics : ServerMetrics, default one reading the engine's queue and batch gauges
    max_body_bytes : int, the largest request body (413 beyond)

    Returns
    -------
    FastAPI

    Example
    -------
    >>> app = build_app(engine, "memdec-fast")
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    app = FastAPI(title="memdec-fast", docs_url=None, redoc_url=None, openapi_url=None)
    serving = CompletionServing(engine, model_name, metrics)
    app.state.serving = serving
    app.state.draining = False

    def refuse(raw: Request, err: ApiError) -> JSONResponse:
        """Every refused or failed completion request is counted here, once."""
        if raw.url.path == "/v1/completions" and not err.counted:
            err.counted = True
            serving.metrics.request_done(outcome_of(err), memory=err.memory)
        return _api_error_response(err)

    @app.exception_handler(ApiError)
    async def _api_error(raw: Request, err: ApiError) -> JSONResponse:
        return refuse(raw, err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(raw: Request, err: RequestValidationError) -> JSONResponse:
        return refuse(raw, _validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(raw: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(err.status_code, "invalid_request_error" if err.status_code < 500 else "server_error")
        return refuse(raw, ApiError(err.status_code, str(err.detail), kind))

    @app.exception_handler(Exception)
    async def _internal(raw: Request, err: Exception) -> JSONResponse:
        return refuse(raw, api_error(err))

    @app.get("/health")
    async def health() -> Response:
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not getattr(engine, "healthy", True):
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=m, max_model_len=getattr(engine, "max_context", None))
                               for m in serving.models])

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        if app.state.draining:
            raise ApiError(503, "the server is shutting down and accepts no new requests",
                           "service_unavailable_error", code="engine_closed")
        req = _parse(await _read_body(raw, max_body_bytes))
        if req.stream:
            events = await serving.create(req)
            return StreamingResponse(events, media_type="text/event-stream")
        # Starlette notices a disconnect only while streaming; here a watcher cancels the work (and the engine
        # requests) when the client goes away before its response is ready.
        work = asyncio.ensure_future(serving.create(req))
        gone = asyncio.ensure_future(_disconnected(raw))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(work.result().model_dump())

    return app


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(raw: Request, limit: int) -> bytes:
    """The body of a JSON request, refused with 415 for another content type and 413 beyond `limit` bytes (as
    soon as the limit is passed, without reading the rest)."""
    kind = raw.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"Content-Type: expected application/json, got {kind or 'none'}",
                       "invalid_request_error", "Content-Type")
    declared = raw.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in raw.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"body: larger than this server's limit of {limit} bytes (--max-body-bytes)",
                    "invalid_request_error", "body")


def _parse(body: bytes) -> CompletionRequest:
    if not body.strip():
        raise bad_request("body: empty; expected a JSON object", "body")
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as err:
        raise _validation_error(err.errors()) from None


def _api_error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _validation_error(errors: list) -> ApiError:
    """The first pydantic error as one line naming the field, e.g. "max_tokens: Input should be ..."."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # a union (prompt, stop) reports each member's failure; its first path element is the field
    param = loc[0] if loc else None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return bad_request(f"body: invalid JSON ({first.get('ctx', {}).get('error', msg)})", "body")
    if first.get("type") == "model_type":
        return bad_request("body: expected a JSON object", "body")
    if first.get("type") == "missing":
        return bad_request(f"{param}: field required", param)
    where = ".".join(loc[:1] + [x for x in loc[1:] if x.isdigit()])
    return bad_request(f"{where or 'body'}: {msg}", param)
