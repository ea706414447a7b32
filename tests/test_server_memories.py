"""memdec-fast serve with several memories over one base: one model id each, driven by the official openai client.

Ids: the served name is the base alone, '<served>:<memory>' each memory. Tiny random checkpoints (CPU, float32).
"""

from __future__ import annotations

import argparse
import signal

import pytest
from conftest import require_test_extras
from test_engine_memories import MIXING, specs
from test_engine_memories import paths as paths  # noqa: PLC0414 - the fixture, re-exported for pytest
from test_engine_memories import refs as refs  # noqa: PLC0414

require_test_extras("fastapi", "uvicorn", "openai", "httpx")

import httpx
import openai
from test_server import MODEL, TIMEOUT, _serve_process, client, metric, running_server, scrape

from memdec_fast.cli.args import UsageError, memory_flags
from memdec_fast.engine import Engine

IDS = [MODEL] + [f"{MODEL}:{name}" for name in MIXING]


@pytest.fixture(scope="module")
def served(ckpts, paths):
    engine = Engine.from_pretrained(ckpts["base"], memories=specs(paths), cuda_graphs=False, max_batch=4)
    try:
        with running_server(engine) as (url, _):
            yield url
    finally:
        engine.close(timeout=10)


def test_models_lists_the_base_alone_and_each_memory(served):
    assert [m.id for m in client(served).models.list().data] == IDS


@pytest.mark.parametrize("memory", [None, *MIXING])
def test_one_request_per_memory_equals_joint_generator_alone(served, refs, memory):
    model = MODEL if memory is None else f"{MODEL}:{memory}"
    res = client(served).completions.create(model=model, prompt="the lazy dog", max_tokens=6, temperature=0)
    kw = {"lmbda": 0.0} if memory is None else {}
    alone = refs[memory].generate("the lazy dog", max_new_tokens=6, **kw)
    assert res.model == model
    assert res.choices[0].text == alone.texts[0]
    assert res.usage.completion_tokens == len(alone.token_ids[0])


def test_streaming_picks_the_memory_too(served, refs):
    chunks = client(served).completions.create(model=f"{MODEL}:law", prompt="a plug", max_tokens=5, temperature=0,
                                               stream=True)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == refs["law"].generate("a plug", max_new_tokens=5).texts[0]


def test_unknown_model_is_a_404_listing_the_served_ids(served):
    with pytest.raises(openai.NotFoundError) as err:
        client(served).completions.create(model=f"{MODEL}:tax", prompt="hi", max_tokens=2)
    body = err.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert body["message"] == (f"model: '{MODEL}:tax' is not served here; this server serves "
                               + ", ".join(repr(i) for i in IDS))
    r = httpx.post(served + "/v1/completions", json={"model": "bio", "prompt": "hi"}, timeout=TIMEOUT)
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_metrics_carry_the_memory_label(served):
    before = scrape(served)
    for model, n in zip(IDS, (2, 3, 4, 5)):
        client(served).completions.create(model=model, prompt="the fox", max_tokens=n, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client(served).completions.create(model="nope", prompt="hi", max_tokens=2)
    text = scrape(served)

    def delta(name, labels):
        return metric(text, name, labels) - metric(before, name, labels)

    for label, n in zip(["base", *MIXING], (2, 3, 4, 5)):
        m = f'memory="{label}"'
        assert delta("memdec_fast_requests_total", f'outcome="success",{m}') == 1
        assert delta("memdec_fast_generation_tokens_total", m) == n
        assert delta("memdec_fast_time_to_first_token_seconds_count", m) == 1
        assert delta("memdec_fast_time_per_output_token_seconds_count", m) == n - 1
        assert delta("memdec_fast_e2e_request_latency_seconds_count", m) == 1
        assert f'memdec_fast_e2e_request_latency_seconds_bucket{{{m},le="+Inf"}}' in text
    assert delta("memdec_fast_requests_total", 'outcome="bad_request",memory=""') == 1  # no model, no memory
    try:  # the official parser reads it, where it is installed
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["memory"] for s in families["memdec_fast_requests"].samples} >= {"base", *MIXING}


# -- the command line ---------------------------------------------------------------------------------------------

def flags(*memory: str) -> argparse.Namespace:
    return argparse.Namespace(base="B", memory=list(memory) or None)


def test_memory_flags_take_one_path_or_several_named_ones():
    assert memory_flags(flags("P")) == ("B", "P")
    assert memory_flags(flags("bio=P")) == ("B", {"bio": "P"})
    assert memory_flags(flags("bio=P", "law=Q")) == ("B", {"bio": "P", "law": "Q"})
    assert memory_flags(flags("./runs/lr=3")) == ("B", "./runs/lr=3")  # a "/" before the "=": a path


@pytest.mark.parametrize(("given", "message"), [
    (("bio=P", "Q"), "each be NAME=PATH"),
    (("P", "Q"), "each be NAME=PATH"),
    (("bio=P", "bio=Q"), "memory 'bio': the name is given twice"),
    (("b:io=P",), "memory 'b:io': a memory name takes"),
    (("base=P",), "memory 'base': the name is reserved"),
    (("bio=",), "no path after bio="),
])
def test_memory_flags_refuse_in_one_line(given, message):
    with pytest.raises(UsageError, match=message) as err:
        memory_flags(flags(*given))
    assert "\n" not in str(err.value)


def test_serve_command_takes_repeated_named_memories(ckpts, paths, tmp_path):
    pair = (ckpts["base"], f"bio={paths['bio']}")
    proc, url = _serve_process(pair, tmp_path, "--memory", f"fin={paths['fin']}", "--max-batch", "2")
    try:
        assert [m.id for m in client(url).models.list().data] == [MODEL, f"{MODEL}:bio", f"{MODEL}:fin"]
        res = client(url).completions.create(model=f"{MODEL}:fin", prompt="the fox", max_tokens=3, temperature=0)
        assert res.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
