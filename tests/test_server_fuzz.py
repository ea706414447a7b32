"""Property-based fuzzing of POST /v1/completions: random field names, types, sizes and nesting.

Every body must get 200 or a 4xx carrying OpenAI's error JSON, within a bounded time: never a 500, a hang or a cut
connection. Meanwhile a greedy request runs beside the fuzzer, again and again, and must return the text it returns
alone. The budget is fixed (a bounded number of examples on a tiny model): seconds, not minutes.
"""

from __future__ import annotations

import json
import threading

import httpx
import test_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import MODEL, expected
from test_server_limits import GREEDY

pair, real, reference = test_server.pair, test_server.real, test_server.reference  # the server suite's fixtures

EXAMPLES = 150
REQUEST_TIMEOUT = 30.0  # a hang fails the test instead of the suite

_EDGES = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, 10**400]
_FLOAT_EDGES = [0.0, -0.0, 1e-45, 3.4028234663852886e38, 3.5e38, 1.7976931348623157e308, float("inf"),
                float("-inf"), float("nan")]

leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-1000, 1000), st.sampled_from(_EDGES), st.floats(),
    st.sampled_from(_FLOAT_EDGES), st.text(max_size=12), st.sampled_from(["", "\x00", "数据", "a\ud800", "Q" * 2000]),
)
anything = st.recursive(
    leaf, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
small_ints = st.one_of(st.integers(-3, 10), st.sampled_from(_EDGES))
unit = st.one_of(st.floats(-0.5, 1.5), st.sampled_from(_FLOAT_EDGES))
token_ids = st.lists(st.one_of(st.integers(-2, 400), st.sampled_from(_EDGES)), max_size=6)
prompts = st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=4), token_ids,
                    st.lists(token_ids, max_size=3))
# plausible values per field, often valid, so that bodies get past the first check; any JSON value otherwise
FIELDS = {
    "max_tokens": small_ints, "temperature": unit, "top_p": unit, "top_k": small_ints, "min_p": unit,
    "lmbda": unit, "seed": small_ints, "logprobs": small_ints, "n": small_ints, "best_of": small_ints,
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=20)),
    "stop_token_ids": token_ids, "echo": st.booleans(), "suffix": st.text(max_size=3),
    "presence_penalty": unit, "frequency_penalty": unit, "logit_bias": anything, "user": st.text(max_size=5),
}
FIELD_NAMES = sorted(FIELDS) + ["model", "prompt", "unknown_field"]


def _mutated(names: list[str]):
    return st.fixed_dictionaries({k: st.one_of(FIELDS.get(k, prompts), anything) for k in names})


# a valid body with up to three fields replaced, so that most bodies reach the check of the field they break
valid = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": st.text(min_size=1, max_size=20),
                               "max_tokens": st.integers(1, 4)})
bodies = st.one_of(
    st.tuples(valid, st.lists(st.sampled_from(FIELD_NAMES), max_size=3, unique=True).flatmap(_mutated)).map(
        lambda parts: parts[0] | parts[1]),
    anything,  # not even an object
)
# bodies that once killed the engine or failed everyone else's requests: always tried
KNOWN = [{"top_k": 10**400, "temperature": 1}, {"top_k": 2**63, "temperature": 1}, {"top_k": 1e308},
         {"seed": 2**64}, {"temperature": 1e400}, {"prompt": [True, False]}, {"stop": ["Q" * 400_000]},
         {"prompt": ["a", ""]}, {"max_tokens": 10**30}, {"stop_token_ids": [2**63]}, {"prompt": "a\ud800b"}]


def send(url: str, body) -> None:
    """Post `body` as JSON and check the contract: 200, or a 4xx with OpenAI's error object."""
    text = json.dumps(body)  # floats beyond JSON (NaN, Infinity) go out as such: the server must refuse them
    with httpx.stream("POST", url + "/v1/completions", content=text, timeout=REQUEST_TIMEOUT,
                      headers={"content-type": "application/json"}) as r:
        raw = r.read().decode()
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, raw[:500], text[:500])
    if r.status_code != 200:
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], raw
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in raw.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", raw[-500:]
        assert not any('"error"' in e for e in events), raw[-500:]  # a valid request does not fail mid-stream
    else:
        assert json.loads(raw)["choices"], raw


def test_any_body_gets_200_or_a_4xx_and_a_request_beside_it_is_unaffected(real, reference):
    url, engine, _ = real
    want = expected(reference, GREEDY["prompt"], GREEDY["max_tokens"])[0]
    stop, texts = threading.Event(), []

    def beside():
        while not stop.is_set():
            try:
                r = httpx.post(url + "/v1/completions", json=GREEDY, timeout=REQUEST_TIMEOUT)
                texts.append(r.json()["choices"][0]["text"])
            except Exception as err:  # noqa: BLE001 - a hang or a failure of the neighbour is what this test finds
                texts.append(repr(err))
                return

    neighbour = threading.Thread(target=beside)
    neighbour.start()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies)
    def fuzz(body):
        send(url, body)

    for known in KNOWN:
        fuzz.hypothesis.inner_test({"model": MODEL, "prompt": "a", "max_tokens": 2} | known)

    try:
        fuzz()
    finally:
        stop.set()
        neighbour.join(REQUEST_TIMEOUT)
    assert texts and all(t == want for t in texts), texts
    assert engine.healthy and httpx.get(url + "/health", timeout=5).status_code == 200
