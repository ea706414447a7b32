"""memdec-fast serve: a real uvicorn server on 127.0.0.1 and an ephemeral port, driven by the official openai client.

Most tests run the server in a thread over the real engine and a tiny random pair;
the SIGTERM test runs ``memdec-fast serve`` as a process. A fake engine stands in
where the real one cannot be made to fail on demand (RequestFailed -> 500).
Every wait is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

import memdec_fast  # noqa: E402
from memdec_fast.engine.types import EngineClosed, EngineOverloaded, RequestFailed, StreamDelta  # noqa: E402
from memdec_fast.server.app import build_app  # noqa: E402
from memdec_fast.server.cli import _bind  # noqa: E402

MODEL = "memdec-fast"
TIMEOUT = 60.0


@contextlib.contextmanager
def running_server(engine, **app_kw) -> Iterator[tuple[str, object]]:
    """uvicorn serving build_app(engine) in a thread on an ephemeral port: yields (base_url, app)."""
    sock = _bind("127.0.0.1", 0)
    app = build_app(engine, MODEL, **app_kw)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def client(url: str, timeout: float = TIMEOUT) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def aclient(url: str, timeout: float = TIMEOUT) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text, e.g. metric(t, "memdec_fast_requests_total", 'outcome="success"')."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(key)


def scrape(url: str) -> str:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def wait_until(cond, seconds: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- a fake engine, for the failures the real one cannot be made to produce ----------------------------------------


class FakeEngine:
    """The engine interface over no model: echoes the prompt's tokens, one per `delay` seconds.

    The prompt "fail" raises RequestFailed at its second token; "crash" raises a RuntimeError.
    """

    max_context = 64

    def __init__(self, tokenizer, max_batch: int = 4, max_queue: int = 4, delay: float = 0.005):
        self.tokenizer, self.max_batch, self.max_queue, self.delay = tokenizer, max_batch, max_queue, delay
        self.active, self.closed = 0, False

    @property
    def num_running(self) -> int:
        return min(self.active, self.max_batch)

    @property
    def num_waiting(self) -> int:
        return max(0, self.active - self.max_batch)

    def stream(self, prompt, max_new_tokens=16, stop=None, request_id=None, **sampling):
        if self.closed:
            raise EngineClosed("closed")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompts[0]: empty prompt (it encodes to no tokens)")
        if sampling.get("temperature", 0) > 100:
            raise ValueError(f"temperature: {sampling['temperature']} is too hot for the fake")
        if len(ids) + max_new_tokens - 1 > self.max_context:
            raise ValueError(f"prompt too long: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} ...")
        if self.active >= self.max_batch + self.max_queue:
            raise EngineOverloaded("queue full")
        self.active += 1
        return self._run(prompt, ids, max_new_tokens, request_id or "r")

    async def _run(self, prompt, ids, n, rid):
        try:
            for i in range(n):
                await asyncio.sleep(self.delay)
                if prompt == "fail" and i == 1:
                    raise RequestFailed("row 3 produced NaN logits")
                if prompt == "crash":
                    raise RuntimeError("secret internal detail")
                t = ids[i % len(ids)]
                yield StreamDelta(rid, self.tokenizer.decode([t]), [t], [-0.5], "length" if i == n - 1 else None,
                                  len(ids))
        finally:
            self.active -= 1


@pytest.fixture(scope="module")
def fake(tokenizer):
    engine = FakeEngine(tokenizer)
    with running_server(engine) as (url, app):
        yield url, engine, app


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "File \"" not in r.text
    if param is not None:
        assert err["param"] == param and err["message"].startswith(param), err
    return err


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"lmbda": 1.5}, "lmbda"),
    ({"seed": -1}, "seed"),
    ({"logprobs": 9}, "logprobs"),
    ({"n": 2}, "n"),
    ({"echo": True}, "echo"),
    ({"stop": [1.5]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": ""}, "prompt"),  # the engine's ValueError
    ({"temperature": 1000}, "temperature"),  # the engine's ValueError, as the fake raises it
    ({"prompt": "the " * 40, "max_tokens": 40}, "prompt"),  # prompt too long
    ({"max_tokens": 60, "prompt": "the quick brown fox jumps over the lazy dog " * 2}, "prompt"),
])
def test_bad_fields_are_400_naming_the_field(fake, body, param):
    url, _, _ = fake
    assert_error(post(url, {"model": MODEL, "prompt": "the fox", **body}), 400, param)


def test_missing_field_and_bad_json_are_400(fake):
    url, _, _ = fake
    assert_error(post(url, {"prompt": "x"}), 400, "model")
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert_error(r, 400)


def test_bad_field_through_the_openai_client(fake):
    url, _, _ = fake
    with pytest.raises(openai.BadRequestError) as info:
        client(url).completions.create(model=MODEL, prompt="the fox", max_tokens=0)
    assert "max_tokens" in str(info.value)


def test_unknown_model_is_404_and_unknown_route_is_json(fake):
    url, _, _ = fake
    assert_error(post(url, {"model": "gpt-4", "prompt": "x"}), 404, "model")
    r = httpx.get(url + "/v2/nothing", timeout=TIMEOUT)
    assert_error(r, 404)


def test_request_failed_is_500_without_a_trace(fake):
    url, _, _ = fake
    err = assert_error(post(url, {"model": MODEL, "prompt": "fail", "max_tokens": 4}), 500)
    assert "NaN" in err["message"]
    err = assert_error(post(url, {"model": MODEL, "prompt": "crash"}), 500)
    assert "secret" not in err["message"]


def test_request_failed_mid_stream_is_an_error_event(fake):
    url, _, _ = fake
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "fail", "stream": True},
                      timeout=TIMEOUT) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_failed"


def test_overload_is_429(fake):
    url, engine, _ = fake
    engine.active = engine.max_batch + engine.max_queue  # as if the queue were full
    try:
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model=MODEL, prompt="the fox")
    finally:
        engine.active = 0


def test_closed_and_draining_are_503(fake):
    url, engine, app = fake
    engine.closed = True
    try:
        assert_error(post(url, {"model": MODEL, "prompt": "x"}), 503)
    finally:
        engine.closed = False
    app.state.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client(url).completions.create(model=MODEL, prompt="the fox")
        assert info.value.status_code == 503
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 503
    finally:
        app.state.draining = False
    assert httpx.get(url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}


def test_logprobs_usage_and_several_prompts(fake, tokenizer):
    url, _, _ = fake
    res = client(url).completions.create(model=MODEL, prompt=["the fox", "a memory"], max_tokens=3, logprobs=0)
    assert [c.index for c in res.choices] == [0, 1]
    for c, p in zip(res.choices, ["the fox", "a memory"]):
        ids = tokenizer.encode(p, add_special_tokens=False)
        assert c.text == tokenizer.decode([ids[i % len(ids)] for i in range(3)]) and c.finish_reason == "length"
        assert c.logprobs.token_logprobs == [-0.5] * 3 and "".join(c.logprobs.tokens) == c.text
        assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset[1] == len(c.logprobs.tokens[0])
    prompt_tokens = sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in ["the fox", "a memory"])
    assert res.usage.prompt_tokens == prompt_tokens and res.usage.completion_tokens == 6
    assert res.usage.total_tokens == prompt_tokens + 6


def test_stream_usage_option(fake):
    url, _, _ = fake
    chunks = list(client(url).completions.create(model=MODEL, prompt="the fox", max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    assert all(c.usage is None for c in chunks[:-1])
