"""One request must never hurt another: values at the edges of their ranges, a loop that dies, stale cache slots.

Each test here reproduces a way one request used to fail others (a dead loop thread, a failed batch, a slot that
kept an earlier request's NaN) and checks that only the request at fault is touched.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import save_gpt2
from test_engine import PROMPTS, WAIT, assert_equals_alone, load

from memdec_fast import JointGenerator
from memdec_fast.engine import Engine, EngineClosed, InvalidArgument


@pytest.fixture(scope="module")
def ref(ckpts):
    return load(ckpts, "decoder")


@pytest.mark.parametrize("top_k", [10**400, 2**63, 2**63 - 1, 10**6])
def test_a_top_k_beyond_int64_keeps_every_token_and_the_loop_alive(ckpts, ref, top_k):
    with Engine(load(ckpts, "decoder"), max_batch=2) as engine:
        beside = engine.submit(PROMPTS[0], max_new_tokens=6)
        out = engine.submit(PROMPTS[1], max_new_tokens=6, temperature=1.0, top_k=top_k, seed=3).result(WAIT)
        # top_k >= the vocabulary is no filter at all: the same draws as top_k=0
        assert out.token_ids == ref.generate(PROMPTS[1], max_new_tokens=6, temperature=1.0, seed=3).token_ids[0]
        assert_equals_alone(beside.result(WAIT), ref, PROMPTS[0], max_new_tokens=6)
        assert engine.healthy


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"seed": 2**64}, "seed"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 1e39}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"lmbda": -0.0 - 1e-9}, "lmbda"),
    ({"max_new_tokens": 10**30}, "prompt"),  # does not fit the context
    ({"stop": ["a\ud800"]}, "stop"),
])
def test_values_the_step_cannot_take_are_refused_at_the_call_naming_the_argument(ckpts, kwargs, param):
    with Engine(load(ckpts, "decoder"), max_batch=2) as engine:
        with pytest.raises(InvalidArgument) as err:
            engine.submit(PROMPTS[0], **kwargs)
        assert err.value.param == param
        assert engine.num_waiting == 0


def test_a_lone_surrogate_in_the_prompt_is_an_invalid_argument(ckpts):
    with Engine(load(ckpts, "decoder"), max_batch=1) as engine, pytest.raises(InvalidArgument, match="surrogate"):
        engine.submit("a\ud800b")


def test_when_the_loop_dies_every_request_fails_at_once_and_the_engine_says_so(ckpts, ref):
    engine = Engine(load(ckpts, "decoder"), max_batch=1, max_queue=4)
    gate = threading.Event()
    iteration = engine._iteration

    def dying():
        gate.wait(WAIT)
        raise SystemExit("a bug outside any request")  # not an Exception: the per-request guards let it through

    engine._iteration = dying
    futs = [engine.submit(p, max_new_tokens=4) for p in PROMPTS[:3]]
    assert engine.healthy
    gate.set()
    for f in futs:
        with pytest.raises(EngineClosed, match="internal error"):
            f.result(WAIT)
    assert not engine.healthy
    with pytest.raises(EngineClosed, match="internal error"):
        engine.submit(PROMPTS[0])
    engine._iteration = iteration
    engine.close()


def test_a_reused_slot_carries_nothing_of_its_previous_request(tmp_path, tokenizer):
    """A memory whose position embeddings are NaN from position 20 on: a request with lmbda 0 may run past it (the
    memory has no weight), and the next request in its slot must not see the NaN it left in the cache."""
    base = save_gpt2(tmp_path / "base", tokenizer, seed=0)
    memory = save_gpt2(tmp_path / "memory", tokenizer, seed=1, n_embd=48, n_head=3, n_layer=3)
    gen = JointGenerator.from_pretrained(base, memory, lmbda=0.4, cuda_graphs=False)
    with torch.no_grad():
        gen.memory.model.wpe.weight[20:] = float("nan")
    want = gen.generate(PROMPTS[0], max_new_tokens=8)
    with Engine(gen, max_batch=1) as engine:
        first = engine.submit(PROMPTS[0], max_new_tokens=8).result(WAIT)
        engine.submit(PROMPTS[4], max_new_tokens=40, lmbda=0.0).result(WAIT)  # writes NaN at positions 20+
        again = engine.submit(PROMPTS[0], max_new_tokens=8).result(WAIT)
    assert first.token_ids == again.token_ids == want.token_ids[0]
