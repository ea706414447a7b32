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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_test_extras, save_gpt2
from finish_cases import at_last_token, tokenizer_with_eos

require_test_extras("fastapi", "uvicorn", "openai", "httpx")

import httpx
import openai
import uvicorn

import memdec_fast
from memdec_fast.engine.types import EngineClosed, EngineOverloaded, InvalidArgument, RequestFailed, StreamDelta
from memdec_fast.server.app import build_app
from memdec_fast.server.cli import _bind

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
    """The sum of the samples of `name` whose labels include `labels` in Prometheus text, e.g.
    metric(t, "memdec_fast_requests_total", 'outcome="success"') sums over the memory label."""
    want = set(labels.split(",")) if labels else set()
    found, total = False, 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        sample, _, have = head.partition("{")
        if sample == name and want <= set(filter(None, have.rstrip("}").split(","))):
            found, total = True, total + float(value)
    if not found:
        raise KeyError(f"{name}{{{labels}}}")
    return total


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
            raise InvalidArgument("prompt", "empty prompt (it encodes to no tokens)")
        if sampling.get("temperature", 0) > 100:
            raise InvalidArgument("temperature", f"{sampling['temperature']} is too hot for the fake")
        if len(ids) + max_new_tokens - 1 > self.max_context:
            raise InvalidArgument("prompt", f"too long: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} ...")
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


# -- the real engine over a tiny random pair -----------------------------------------------------------------------

LMBDA, KNN_TEMP = 0.4, 1.5
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "memory", "decoders", "give", "a", "base", "model", "domain", "knowledge", "a", "plug", "and", "play", "memory", "for", "large", "language", "models"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny base and Memory Decoder with a 512-token context, so that a request can run for a while."""
    root = tmp_path_factory.mktemp("serve_pair")
    base = save_gpt2(root / "base", tokenizer, seed=10, n_positions=512)
    memory = save_gpt2(root / "memory", tokenizer, seed=11, n_positions=512, n_embd=48, n_head=3)
    return base, memory


def start_engine(pair, **kw):
    from memdec_fast.engine import Engine

    engine = Engine.from_pretrained(*pair, lmbda=LMBDA, knn_temp=KNN_TEMP, device="cpu", **kw)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def real(pair):
    engine = start_engine(pair, max_batch=8, max_queue=64)
    try:
        with running_server(engine) as (url, app):
            yield url, engine, app
    finally:
        engine.close(timeout=10)


@pytest.fixture(scope="module")
def reference(pair):
    from memdec_fast import JointGenerator

    return JointGenerator.from_pretrained(*pair, lmbda=LMBDA, knn_temp=KNN_TEMP, device="cpu")


def expected(gen, prompt: str, max_tokens: int, stop=None) -> tuple[str, str, int]:
    """(text, OpenAI finish_reason, completion tokens) of JointGenerator.generate alone, greedy."""
    res = gen.generate(prompt, max_new_tokens=max_tokens, stop=stop)
    return res.texts[0], "length" if res.finish_reasons[0] == "length" else "stop", len(res.token_ids[0])


def specs(gen, n: int) -> list[dict]:
    """n greedy requests: prompts of 1 to 24 words, max_tokens 1 to 40, every third one with a stop string that
    occurs in its unstopped completion."""
    out = []
    for i in range(n):
        prompt = " ".join(WORDS[i % 7: i % 7 + 1 + (5 * i) % 24])
        max_tokens = 1 + (7 * i) % 40
        stop = None
        if i % 3 == 0:
            text = expected(gen, prompt, max_tokens)[0]
            if len(text) >= 4:
                stop = [text[len(text) // 2: len(text) // 2 + 2], "\x00never"]
        out.append({"prompt": prompt, "max_tokens": max_tokens, "stop": stop})
    return out


def test_32_concurrent_greedy_completions_equal_generate_alone(real, reference):
    url, _, _ = real
    reqs = specs(reference, 32)
    assert sum(r["stop"] is not None for r in reqs) >= 5

    async def run():
        async with aclient(url) as c:
            calls = [c.completions.create(model=MODEL, temperature=0, **r) for r in reqs]
            return await asyncio.wait_for(asyncio.gather(*calls), 120)

    results = asyncio.run(run())
    stopped = 0
    for r, res in zip(reqs, results):
        text, finish, n = expected(reference, r["prompt"], r["max_tokens"], r["stop"])
        choice = res.choices[0]
        assert (choice.text, choice.finish_reason) == (text, finish), r
        assert res.usage.completion_tokens == n
        assert res.usage.prompt_tokens == len(reference.tokenizer.encode(r["prompt"], add_special_tokens=False))
        stopped += r["stop"] is not None and finish == "stop"
    assert stopped >= 3  # the stop strings did stop some requests


def test_streaming_joined_equals_non_streaming(real):
    url, _, _ = real
    c = client(url)
    cases = [
        {"prompt": "the quick brown fox", "max_tokens": 30, "temperature": 0},
        {"prompt": "a plug and play memory", "max_tokens": 25, "temperature": 0.9, "seed": 7, "top_p": 0.9},
        {"prompt": "memory decoders", "max_tokens": 20, "temperature": 1.2, "seed": 3, "extra_body": {"top_k": 20}},
        {"prompt": "the lazy dog", "max_tokens": 40, "temperature": 0, "extra_body": {"lmbda": 0.9}},
        {"prompt": "large language models", "max_tokens": 30, "temperature": 0, "logprobs": 1},
    ]
    for case in cases:
        whole = c.completions.create(model=MODEL, **case)
        chunks = list(c.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **case))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert text == whole.choices[0].text and finish == [whole.choices[0].finish_reason], case
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
        if "logprobs" in case:
            got = [lp for ch in chunks if ch.choices for lp in ch.choices[0].logprobs.token_logprobs]
            assert got == whole.choices[0].logprobs.token_logprobs
            assert len(got) == whole.usage.completion_tokens and all(lp <= 0 for lp in got)
    # a per-request lmbda changes the mixture
    assert c.completions.create(model=MODEL, **cases[3]).choices[0].text != c.completions.create(
        model=MODEL, **{k: v for k, v in cases[3].items() if k != "extra_body"}).choices[0].text


def complete(url: str, body: dict, stream: bool) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one completion, streamed or not."""
    c = client(url)
    if not stream:
        res = c.completions.create(model=MODEL, **body)
        return res.choices[0].text, res.choices[0].finish_reason, res.usage.completion_tokens
    chunks = list(c.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **body))
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1
    return "".join(ch.choices[0].text for ch in chunks if ch.choices), finish[0], chunks[-1].usage.completion_tokens


def test_each_stop_condition_at_the_last_token_finishes_with_stop(real, reference, pair):
    # max_tokens is reached by the very token that stops the request: OpenAI's "stop", as JointGenerator's reason
    url, _, _ = real
    case = at_last_token(reference, [" ".join(WORDS[i : i + 3]) for i in range(0, 21, 3)])
    body = {"prompt": case.prompt, "max_tokens": case.n, "temperature": 0}
    for extra, stop in (({}, None), ({"extra_body": {"stop_token_ids": [case.stop_id]}}, [case.stop_id]),
                        ({"stop": [case.stop_string]}, [case.stop_string])):
        want = expected(reference, case.prompt, case.n, stop)
        assert want[1:] == ("length" if stop is None else "stop", case.n)
        for stream in (False, True):
            assert complete(url, body | extra, stream) == want, (extra, stream)
    gen = type(reference)(reference.base, reference.memory, tokenizer_with_eos(reference.tokenizer, case.stop_id),
                          lmbda=LMBDA, knn_temp=KNN_TEMP)
    assert gen.generate(case.prompt, max_new_tokens=case.n).finish_reasons == ["eos"]
    engine = start_engine(pair, tokenizer=tokenizer_with_eos(reference.tokenizer, case.stop_id), max_batch=2)
    try:
        with running_server(engine) as (eos_url, _):
            for stream in (False, True):
                assert complete(eos_url, body, stream) == expected(gen, case.prompt, case.n), stream
    finally:
        engine.close(timeout=10)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),  # a token id outside the vocabulary
    ({"prompt": "the fox", "max_tokens": 600}, "prompt"),  # prompt too long for the 512-token context
    ({"prompt": "the fox", "stop": [""]}, "stop"),
    ({"prompt": "the fox", "stop_token_ids": [10**6]}, "stop"),
])
def test_the_engines_value_errors_are_400_naming_the_field(real, body, param):
    url, engine, _ = real
    err = assert_error(post(url, {"model": MODEL, **body}), 400, param)
    assert "max_new_tokens" not in err["message"]
    assert engine.num_waiting == 0


def test_token_id_prompts_and_several_prompts(real, reference):
    url, _, _ = real
    texts = ["the quick brown fox", "a plug and play memory", "memory"]
    ids = [reference.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    c = client(url)
    by_text = c.completions.create(model=MODEL, prompt=texts, max_tokens=12, temperature=0)
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    one = c.completions.create(model=MODEL, prompt=ids[1], max_tokens=12, temperature=0)
    assert [ch.text for ch in by_text.choices] == [ch.text for ch in by_ids.choices]
    assert [ch.index for ch in by_ids.choices] == [0, 1, 2] and one.choices[0].text == by_ids.choices[1].text
    assert [ch.text for ch in by_text.choices] == [expected(reference, t, 12)[0] for t in texts]
    assert by_ids.usage.prompt_tokens == sum(len(i) for i in ids)


def test_client_disconnect_mid_stream_cancels_and_frees_its_slot(real, reference):
    url, engine, _ = real
    before = metric(scrape(url), "memdec_fast_requests_total", 'outcome="cancelled"')
    others = specs(reference, 6)

    async def run():
        async with aclient(url) as c:
            stream = await c.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=500,
                                                temperature=0, stream=True)
            rest = asyncio.gather(*[c.completions.create(model=MODEL, temperature=0, **r) for r in others])
            got = 0
            async for chunk in stream:
                got += bool(chunk.choices and chunk.choices[0].text)
                if got == 3:
                    break
            await stream.close()  # the client goes away mid-stream
            return await asyncio.wait_for(rest, 120)

    results = asyncio.run(run())
    for r, res in zip(others, results):
        text, finish, _ = expected(reference, r["prompt"], r["max_tokens"], r["stop"])
        assert (res.choices[0].text, res.choices[0].finish_reason) == (text, finish)
    wait_until(lambda: metric(scrape(url), "memdec_fast_requests_total", 'outcome="cancelled"') == before + 1,
               what="the cancelled request to be counted")
    wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, what="the slot to be freed")
    assert metric(scrape(url), "memdec_fast_num_requests_running") == 0


def test_client_that_leaves_before_a_non_streamed_response_cancels_it(real):
    url, engine, _ = real
    before = metric(scrape(url), "memdec_fast_requests_total", 'outcome="cancelled"')
    with pytest.raises(openai.APITimeoutError):
        client(url, timeout=0.25).completions.create(model=MODEL, prompt="the fox", max_tokens=500, temperature=0)
    wait_until(lambda: metric(scrape(url), "memdec_fast_requests_total", 'outcome="cancelled"') == before + 1,
               what="the cancelled request to be counted")
    wait_until(lambda: engine.num_running == 0, what="the slot to be freed")


def test_full_queue_gives_429_and_the_waiting_request_can_leave(pair):
    engine = start_engine(pair, max_batch=1, max_queue=1)
    try:
        with running_server(engine) as (url, _):
            async def run():
                async with aclient(url) as c:
                    long = {"model": MODEL, "prompt": "the fox", "max_tokens": 500, "temperature": 0, "stream": True}
                    first = await c.completions.create(**long)  # holds the only slot
                    await asyncio.wait_for(first.__anext__(), 30)
                    second = await c.completions.create(**long)  # waits in the queue
                    await asyncio.to_thread(wait_until, lambda: engine.num_waiting == 1, 20, "a waiting request")
                    with pytest.raises(openai.RateLimitError) as info:
                        await c.completions.create(model=MODEL, prompt="the fox", max_tokens=2)
                    assert info.value.body["code"] == "engine_overloaded"
                    await second.close()
                    await first.close()

            asyncio.run(run())
            wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, what="both requests to leave")
            text = scrape(url)
            assert metric(text, "memdec_fast_requests_total", 'outcome="overloaded"') == 1
            assert metric(text, "memdec_fast_requests_total", 'outcome="cancelled"') == 2
            # a slot is free again
            res = client(url).completions.create(model=MODEL, prompt="the fox", max_tokens=3, temperature=0)
            assert res.choices[0].finish_reason == "length"
    finally:
        engine.close(timeout=10)


def test_models_health_and_metrics(real):
    url, engine, _ = real
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    before = scrape(url)
    res = client(url).completions.create(model=MODEL, prompt="the lazy dog", max_tokens=5, temperature=0)
    text = scrape(url)
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total"):
        assert f"# TYPE memdec_fast_{name} counter" in text
    for name in ("num_requests_waiting", "num_requests_running"):
        assert f"# TYPE memdec_fast_{name} gauge" in text
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert f"# TYPE memdec_fast_{name} histogram" in text
        assert f'memdec_fast_{name}_bucket{{memory="default",le="+Inf"}}' in text

    def delta(name, labels=""):
        return metric(text, name, labels) - metric(before, name, labels)

    assert delta("memdec_fast_requests_total", 'outcome="success"') == 1
    assert delta("memdec_fast_prompt_tokens_total") == res.usage.prompt_tokens
    assert delta("memdec_fast_generation_tokens_total") == res.usage.completion_tokens == 5
    assert delta("memdec_fast_time_to_first_token_seconds_count") == 1
    assert delta("memdec_fast_time_per_output_token_seconds_count") == 4
    assert metric(text, "memdec_fast_num_requests_running") == engine.num_running == 0
    try:  # the official parser reads it, where it is installed
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["memdec_fast_time_to_first_token_seconds"].type == "histogram"


def _serve_process(pair, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`memdec-fast serve` as a process on an ephemeral port; returns it and its base URL once it serves."""
    env = os.environ | {"PYTHONPATH": str(Path(memdec_fast.__file__).parents[1])}
    out = tmp_path / "stdout"
    cmd = [sys.executable, "-m", "memdec_fast.cli", "serve", "--base", str(pair[0]), "--memory", str(pair[1]),
           "--device", "cpu", "--port", "0", "--json", "--log-level", "warning", *flags]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 90
    while not out.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    return proc, json.loads(out.read_text().splitlines()[0])["url"].removesuffix("/v1")


def test_sigterm_drains_requests_in_flight_and_exits_0(pair, tmp_path):
    proc, url = _serve_process(pair, tmp_path, "--drain-timeout", "60", "--prefill-chunk", "64", "--max-batch", "4",
                               "--max-context", "448")
    try:
        assert httpx.get(url + "/v1/models", timeout=TIMEOUT).json()["data"][0]["max_model_len"] == 448  # 512 capped
        body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 400, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        events: list[str] = []
        first = threading.Event()

        def read():
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60), "no first token"
        assert reader.is_alive()  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        # while the request drains, the server keeps answering: new requests get the documented 503
        wait_until(lambda: _draining(url), 20, "new requests to get 503")
        reader.join(90)
        assert not reader.is_alive()
        assert proc.wait(60) == 0
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 400  # the request in flight ran to its end
        err = proc.stderr.read()
        assert "draining" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _draining(url: str) -> bool:
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=TIMEOUT)
    return r.status_code == 503 and r.json()["error"]["code"] == "engine_closed"


def test_serve_bad_arguments_exit_2_before_loading(tmp_path, capsys, monkeypatch):
    from memdec_fast.cli import main
    from memdec_fast.server import cli as serve_cli

    def fail(*_):
        raise AssertionError("models loaded")

    monkeypatch.setattr(serve_cli, "_load_engine", fail)

    def run(argv: list[str]) -> int:
        try:
            return main(["serve", *argv])
        except SystemExit as stop:  # argparse's own exits
            return stop.code

    for flags in (["--port", "70000"], ["--port", "x"], ["--max-batch", "0"], ["--max-queue", "-1"], ["--prefill-chunk", "0"],
                  ["--drain-timeout", "-1"], ["--lmbda", "2"], ["--dtype", "float8"], ["--host", "no.such.host."], ["--device", "tpu:x"]):
        assert run(flags) == 2, flags
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error" in err, (flags, err)
    with _bound_port() as port:  # a port in use fails before any model loads
        assert run(["--port", str(port)]) == 2
        assert "cannot bind" in capsys.readouterr().err


@contextlib.contextmanager
def _bound_port():
    sock = _bind("127.0.0.1", 0)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
