"""Hostile and careless input against `memdec-fast serve`: each case once hurt other users or got a wrong status.

Every test that sends a bad request also checks that the service goes on: a greedy request beside it, or after it,
returns JointGenerator's text, and /health answers at once.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import httpx
import pytest
import test_server
from test_server import (
    MODEL,
    TIMEOUT,
    FakeEngine,
    _serve_process,
    assert_error,
    expected,
    metric,
    post,
    running_server,
    scrape,
    start_engine,
)

from memdec_fast.generation.requests import MAX_STOP_LENGTH, MAX_STOP_STRINGS

pair, real, reference = test_server.pair, test_server.real, test_server.reference  # the server suite's fixtures

GREEDY = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0}


def raw_post(url: str, body: bytes | str, headers: dict | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"} if headers is None else headers
    return httpx.post(url + "/v1/completions", content=body, headers=headers, timeout=TIMEOUT)


def assert_serves(url: str, reference) -> None:
    """A greedy request gets JointGenerator's text alone, and /health is green."""
    r = post(url, GREEDY)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(reference, GREEDY["prompt"], GREEDY["max_tokens"])[0]
    assert httpx.get(url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    ('{"prompt":"a","max_tokens":2,"temperature":1,"top_k":1' + "0" * 400 + "}", "top_k"),
    ('{"prompt":"a","top_k":9223372036854775808}', "top_k"),
    ('{"prompt":"a","top_k":1e308}', "top_k"),
    ('{"prompt":"a","temperature":1e400}', "temperature"),
    ('{"prompt":"a","temperature":1e39}', "temperature"),
    ('{"prompt":"a","temperature":NaN}', "temperature"),
    ('{"prompt":"a","max_tokens":1' + "0" * 30 + "}", "max_tokens"),
    ('{"prompt":[1,99999999999999999999]}', "prompt"),
    ('{"prompt":"a","seed":18446744073709551616}', "seed"),
    ('{"prompt":"a","stop_token_ids":[-1]}', "stop_token_ids"),
    ('{"prompt":"a","lmbda":1e400}', "lmbda"),
    ('{"prompt":"a\\ud800b"}', "body"),  # a lone surrogate: not valid JSON text for the parser
    ('{"prompt":"a","stop":"\\udfff"}', "body"),
    ('{"prompt":[true,false]}', "prompt"),
    ('{"prompt":"a","temperature":true}', "temperature"),
    ('{"prompt":"a","stream":"yes"}', "stream"),
    ('{"prompt":"a","logprobs":true}', "logprobs"),
    ('{"prompt":"a","stop":["' + "Q" * (MAX_STOP_LENGTH + 1) + '"]}', "stop"),
    ('{"prompt":"a","stop":' + json.dumps([f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]) + "}", "stop"),
])
def test_numbers_and_types_beyond_what_the_step_takes_are_400_and_nobody_else_notices(real, reference, body, param):
    url, engine, _ = real
    body = '{"model":"' + MODEL + '",' + body[1:]
    assert_error(raw_post(url, body), 400, param)
    assert engine.healthy
    assert_serves(url, reference)


def test_a_failing_prompt_of_a_batch_is_named_by_its_index(real):
    err = assert_error(post(real[0], {"model": MODEL, "prompt": ["a", ""]}), 400, "prompt")
    assert err["message"].startswith("prompt[1]: empty prompt"), err


def test_more_prompts_than_the_server_can_ever_hold_is_400_not_429(real):
    url, engine, _ = real
    n = engine.max_batch + engine.max_queue + 1
    err = assert_error(post(url, {"model": MODEL, "prompt": ["a"] * n, "max_tokens": 1}), 400, "prompt")
    assert "--max-batch + --max-queue" in err["message"]


def test_bodies_need_json_and_fit_the_limit(tokenizer):
    with running_server(FakeEngine(tokenizer), max_body_bytes=1000) as (url, _):
        assert_error(raw_post(url, json.dumps(GREEDY), headers={}), 415, "Content-Type")
        assert_error(raw_post(url, json.dumps(GREEDY), headers={"content-type": "text/plain"}), 415, "Content-Type")
        err = assert_error(raw_post(url, b""), 400, "body")
        assert err["message"] == "body: empty; expected a JSON object"
        assert_error(raw_post(url, b"[1, 2]"), 400, "body")
        big = json.dumps(GREEDY | {"prompt": "x" * 2000})
        assert_error(raw_post(url, big), 413, "body")

        def chunks():  # no Content-Length: refused once the limit is passed
            for _ in range(100):
                yield b" " * 100

        assert_error(raw_post(url, chunks()), 413, "body")
        assert raw_post(url, json.dumps(GREEDY)).status_code == 200


def test_a_huge_prompt_is_tokenised_off_the_event_loop(pair, reference):
    """A 3.5 MB prompt (inside the 4 MiB limit) takes seconds to tokenise; meanwhile /health and other requests
    are answered at once."""
    engine = start_engine(pair, max_batch=4, max_queue=8)
    try:
        with running_server(engine) as (url, _):
            post(url, GREEDY)  # warm-up
            done = threading.Event()
            big = {"model": MODEL, "prompt": "lorem ipsum dolor sit amet " * 130_000, "max_tokens": 1}

            def send():
                assert_error(post(url, big), 400, "prompt")  # far beyond the context, once tokenised
                done.set()

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(0.5)  # the big body is being read and tokenised
            slowest = 0.0
            while not done.is_set():
                start = time.perf_counter()
                assert httpx.get(url + "/health", timeout=30).status_code == 200
                slowest = max(slowest, time.perf_counter() - start)
                time.sleep(0.1)
            sender.join(TIMEOUT)
            assert slowest < 1.0, f"/health took {slowest:.1f} s while a prompt was tokenised"
            assert_serves(url, reference)
    finally:
        engine.close(timeout=10)


def test_every_refused_request_counts_once_in_the_metrics(tokenizer):
    with running_server(FakeEngine(tokenizer), max_body_bytes=1000) as (url, _):
        before = metric(scrape(url), "memdec_fast_requests_total", 'outcome="bad_request"')
        bad = [
            raw_post(url, "{"),  # invalid JSON
            raw_post(url, b""),  # empty
            raw_post(url, json.dumps(GREEDY), headers={}),  # no content type
            raw_post(url, json.dumps(GREEDY | {"prompt": "x" * 2000})),  # too large
            post(url, GREEDY | {"model": "other"}),  # unknown model: 404
            post(url, GREEDY | {"max_tokens": 0}),  # pydantic
            post(url, GREEDY | {"prompt": ""}),  # the engine
        ]
        assert [r.status_code for r in bad] == [400, 400, 415, 413, 404, 400, 400]
        after = metric(scrape(url), "memdec_fast_requests_total", 'outcome="bad_request"')
        assert after - before == len(bad)


def test_logprobs_tokens_and_offsets_agree_with_the_text(real):
    """Byte-level tokens split characters such as "é" and "数": each token's text is what it added to `text`."""
    url, _, _ = real
    for seed in range(12):
        body = {"model": MODEL, "prompt": "héllo wörld 数据 ✓", "max_tokens": 12, "temperature": 1.0, "seed": seed,
                "logprobs": 0}
        choice = post(url, body).json()["choices"][0]
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == choice["text"], lp["tokens"]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 12


def test_health_is_503_when_the_engine_stopped(tokenizer):
    engine = FakeEngine(tokenizer)
    with running_server(engine) as (url, _):
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        engine.healthy = False
        r = httpx.get(url + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "engine stopped"


def _stream(url: str, body: dict, events: list[str], first: threading.Event) -> None:
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            events.append(f"status {r.status_code}")
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    first.set()
    except httpx.HTTPError as err:  # a reset or a cut: what must never happen
        events.append(f"error {type(err).__name__}")
    first.set()


def _keep_alive_request(conn: http.client.HTTPConnection) -> int:
    """A completion on a kept-alive connection: its status (0 when the server closed the connection)."""
    try:
        conn.request("POST", "/v1/completions", json.dumps(GREEDY), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
    except (ConnectionError, http.client.HTTPException):
        return 0
    return response.status


def test_sigterm_answers_everyone_and_a_second_one_ends_open_streams_cleanly(pair, tmp_path):
    """SIGTERM during 8 streams: each gets [DONE]; an idle keep-alive connection gets the documented 503. A second
    SIGTERM then ends the streams still running at once, each with an error event and [DONE]."""
    proc, url = _serve_process(pair, tmp_path, "--drain-timeout", "60", "--max-batch", "8", "--max-context", "448")
    try:
        port = int(url.rsplit(":", 1)[1])
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        assert _keep_alive_request(idle) == 200
        streams = [({"model": MODEL, "prompt": f"the fox {i}", "max_tokens": 8 if i < 4 else 400, "temperature": 0,
                     "stream": True}, [], threading.Event()) for i in range(8)]
        readers = [threading.Thread(target=_stream, args=(url, b, e, f)) for b, e, f in streams]
        for t in readers:
            t.start()
        for _, _, f in streams:
            assert f.wait(60), "no first token"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert _keep_alive_request(idle) == 503
        for t in readers[:4]:
            t.join(60)
        for _, events, _ in streams[:4]:  # the short ones finished while draining
            assert events[0] == "status 200" and events[-1] == "data: [DONE]", events[-3:]
            assert not any(e.startswith("error") for e in events)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        for t in readers[4:]:
            t.join(30)
        assert time.monotonic() - start < 15
        for _, events, _ in streams[4:]:  # the long ones were cut, with an error event and [DONE], never a reset
            assert events[-1] == "data: [DONE]", events[-3:]
            assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "engine_closed"
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "again, stopping now" in err and "Traceback" not in err and "CancelledError" not in err
        idle.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_cache_too_large_for_memory_is_refused_with_its_size(pair, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "memdec_fast.cli", "serve", "--base", str(pair[0]), "--memory",
           str(pair[1]), "--device", "cpu", "--port", "0", "--max-batch", "100000000"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "GiB are available" in r.stderr, r.stderr


@pytest.mark.parametrize("flags", [["--drain-timeout", "inf"], ["--drain-timeout", "nan"], ["--max-context", "1"],
                                   ["--knn-temp", "inf"], ["--knn-temp", "1e400"], ["--served-model-name", ""],
                                   ["--max-body-bytes", "0"]])
def test_serve_flags_out_of_range_exit_2_before_loading(flags, capsys, monkeypatch):
    from memdec_fast.cli import main
    from memdec_fast.server import cli as serve_cli

    def fail(*_):
        raise AssertionError("models loaded")

    monkeypatch.setattr(serve_cli, "_load_engine", fail)
    try:
        code = main(["serve", *flags])
    except SystemExit as stop:
        code = stop.code
    assert code == 2, flags
    assert "error" in capsys.readouterr().err
