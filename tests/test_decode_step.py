"""The one decode step (memdec_fast.engine.step.ModelStep) under JointGenerator: buckets, the graph decision, the
slots a call leaves behind, and the capture path.

On the CPU the step runs eagerly. Over fake CUDA streams and graphs (tests/fake_cuda.py) its capture path runs too:
the warm-up and its undoing, the generator registration, the side stream's fork and join, the failed-capture
fallback. The graphs themselves run only where CUDA is.
"""

from __future__ import annotations

import copy
import logging
import types

import pytest
import torch
from fake_cuda import FakeCuda

from memdec_fast import JointGenerator, ops
from memdec_fast.engine import step as step_module
from memdec_fast.engine.step import ModelStep, batch_bucket, graph_reason, length_bucket

PROMPTS = ["the quick brown fox", "a plug", "memory decoders give a base"]
PROMPTS4 = PROMPTS + ["héllo"]  # a full bucket of 4
LOGGER = step_module.__name__
cuda = pytest.mark.skipif(not torch.cuda.is_available() or not ops.compiled_available(),
                          reason="needs CUDA and the compiled extension")


def flat(logprobs: list[list[float]]) -> torch.Tensor:
    return torch.tensor([lp for row in logprobs for lp in row])


def shrinking_stop(gen: JointGenerator, prompts: list[str], steps: int) -> int:
    """A stop token that ends some rows early, found from a first run, so that the batch shrinks."""
    first = gen.generate(prompts, max_new_tokens=steps)
    for t in sorted({t for ids in first.token_ids for t in ids[:-1]}):
        ended = [t in ids[:-1] for ids in first.token_ids]
        if 0 < ended.count(False) <= len(prompts) // 2:
            return t
    pytest.skip("no token ends the right rows early for these random weights")


# -- buckets and the graph decision ---------------------------------------------------------------

def test_batch_bucket_is_the_next_power_of_two_up_to_the_limit():
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 4, 5, 17, 32, 33)] == [1, 2, 4, 4, 8, 32, 32, 32]
    assert batch_bucket(5, 6) == 6


def test_length_bucket_is_a_power_of_two_at_least_64_and_at_most_the_context():
    assert [length_bucket(n, 1024) for n in (1, 64, 65, 129, 1000, 1024)] == [64, 64, 128, 256, 1024, 1024]
    assert length_bucket(40, 48) == 48
    for bad in (0, 1025):
        with pytest.raises(ValueError, match="length"):
            length_bucket(bad, 1024)


def test_graph_reasons(monkeypatch):
    def pair(device: str, reference: bool = False):
        return types.SimpleNamespace(device=torch.device(device), reference=reference)

    monkeypatch.setattr(ops, "compiled_available", lambda: True)
    assert graph_reason(pair("cuda")) is None  # only the decision: nothing touches CUDA
    assert "not CUDA" in graph_reason(pair("cpu"))
    assert "reference" in graph_reason(pair("cuda", reference=True))
    monkeypatch.setattr(ops, "compiled_available", lambda: False)
    assert "compiled extension" in graph_reason(pair("cuda"))


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_cpu_generator_logs_graphs_off_once_and_decodes_as_with_graphs_off(ckpts, memory, caplog):
    on = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4)
    off = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4, cuda_graphs=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        a = [on.generate(PROMPTS, max_new_tokens=6, temperature=0.9, seed=3) for _ in range(2)]
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "not CUDA" in records[0].getMessage()  # one step, built once
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = off.generate(PROMPTS, max_new_tokens=6, temperature=0.9, seed=3)
    assert not [r for r in caplog.records if r.name == LOGGER]  # disabled on purpose: nothing to say
    assert a[0].token_ids == a[1].token_ids == b.token_ids and a[0].logprobs == b.logprobs


# -- JointGenerator on the engine's step ----------------------------------------------------------

def test_a_lean_generator_decodes_on_one_step_grown_to_its_largest_call(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    assert gen._step is None  # nothing allocated before the first call
    gen.generate(PROMPTS[0], max_new_tokens=4)
    first = gen._step
    assert isinstance(first, ModelStep) and (first.max_batch, first.context) == (1, 64)
    gen.generate(PROMPTS, max_new_tokens=4)
    assert gen._step is not first and (gen._step.max_batch, gen._step.context) == (4, 64)
    grown = gen._step
    gen.generate(PROMPTS[:2], max_new_tokens=4)
    assert gen._step is grown  # a smaller call reuses it
    for caches in grown.caches:  # each call leaves its slots zeroed: the next user reads no stale value
        for k, v in caches:  # [slots, H, context + 1, Dh]; position `context` is the scratch nothing reads
            assert not k[:, :, : grown.context].any() and not v[:, :, : grown.context].any()


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_decoding_some_rows_alone_gives_their_rows_of_the_full_step(ckpts, memory):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4, cuda_graphs=False)
    step = ModelStep(gen.pair, context=32, max_batch=5, cuda_graphs=False)
    step.set_params(0, {"temperature": 0.0}, rows=5)  # greedy
    step.prefill([(s, [3 + s, 9, 4 * s + 1, 7][: 2 + s % 3], 0) for s in range(5)])
    tokens, positions = [11, 12, 13, 14, 15], [2, 3, 4, 2, 3]
    full, full_tokens, _ = step.decode(tokens, positions)  # all five rows; the next call rewrites the same slots
    slots = [3, 0, 4]
    some, some_tokens, _ = step.decode_rows(slots, [tokens[s] for s in slots], [positions[s] for s in slots])
    for i, s in enumerate(slots):
        torch.testing.assert_close(some[0][i], full[0][s], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(some[1][i], full[1][s], atol=1e-5, rtol=1e-5)
    assert some_tokens == [full_tokens[s] for s in slots]
    step.replay = True
    with pytest.raises(RuntimeError, match="decode_rows"):
        step.decode_rows(slots, [1, 2, 3], [5, 5, 5])


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_a_prefill_and_a_decode_step_in_one_forward_equal_the_two_apart(ckpts, memory):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4, cuda_graphs=False)
    steps = [ModelStep(gen.pair, context=32, max_batch=7, cuda_graphs=False) for _ in range(2)]
    prompts = {0: [3, 9], 1: [4, 9, 5, 7], 2: [5, 9, 9], 4: [7, 9, 17, 7], 5: [1, 2, 3]}  # 5 is still in prefill
    for step in steps:
        step.set_params(0, {"temperature": 0.0}, rows=7)  # greedy
        step.prefill([(s, p, 0) for s, p in prompts.items()])
    # slot 3 starts its prompt, slot 5 goes on with its own; slot 6 is free (a dummy row)
    chunks = [(3, [8, 6, 7, 2, 9], 0), (5, [4, 5, 6, 7], 3)]
    tokens = [11, 12, 13, 0, 15, 0, 0]
    positions = [len(prompts.get(s, ())) for s in range(7)]
    apart, fused = steps
    want_prefill = apart.prefill(chunks)
    after = [5 if s == 3 else 7 if s == 5 else p for s, p in enumerate(positions)]  # past the chunks just read
    want_decode, want_tokens, _ = apart.decode(tokens, after)
    got, got_tokens, _ = fused.prefill_decode(chunks, tokens, positions)  # the chunks stand in for rows 3 and 5
    for i, s in enumerate((3, 5)):
        for model in (0, 1):
            torch.testing.assert_close(got[model][s], want_prefill[model][i], atol=1e-5, rtol=1e-5)
    for s in (0, 1, 2, 4):
        for model in (0, 1):
            torch.testing.assert_close(got[model][s], want_decode[model][s], atol=1e-5, rtol=1e-5)
        assert got_tokens[s] == want_tokens[s]
    # the caches hold the same: the next step agrees on every row, the prompts just read included
    nxt_tokens, nxt_positions = [21, 22, 23, 24, 25, 26, 0], [3, 5, 4, 5, 5, 7, 0]
    want, _, _ = apart.decode(nxt_tokens, nxt_positions)
    got, _, _ = fused.decode(nxt_tokens, nxt_positions)
    for model in (0, 1):
        torch.testing.assert_close(got[model][:6], want[model][:6], atol=1e-5, rtol=1e-5)
    fused.replay = True
    with pytest.raises(RuntimeError, match="prefill_decode"):
        fused.prefill_decode(chunks, tokens, positions)


def test_a_call_that_wrote_nan_into_the_caches_does_not_poison_the_next(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    want = gen.generate(PROMPTS, max_new_tokens=6)
    weight = gen.memory.model.h[0].ln_1.weight
    saved = weight.clone()
    with torch.no_grad():
        weight.fill_(float("nan"))  # every key and value the memory writes is NaN
    with pytest.raises(RuntimeError, match="NaN or infinite logits"):
        gen.generate(PROMPTS, max_new_tokens=6)
    with torch.no_grad():
        weight.copy_(saved)
    assert gen.generate(PROMPTS, max_new_tokens=6).token_ids == want.token_ids


def test_rows_that_end_early_leave_the_batch_and_the_rest_match_each_alone(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["mlp"], lmbda=0.4, cuda_graphs=False)
    stop = shrinking_stop(gen, PROMPTS4, 10)
    got = gen.generate(PROMPTS4, max_new_tokens=10, stop=stop)
    for i, p in enumerate(PROMPTS4):
        alone = gen.generate(p, max_new_tokens=10, stop=stop)
        assert (got.token_ids[i], got.finish_reasons[i]) == (alone.token_ids[0], alone.finish_reasons[0])


# -- the capture path, over fake CUDA streams and graphs, on the CPU -------------------------------------

def fake_captured(gen: JointGenerator, fake: FakeCuda, side: bool = False) -> None:
    """gen's step captured and replayed by `fake` from its next call on (and the memory on a fake side stream)."""
    fake.capture_calls_of(ModelStep, "_decode_body",
                          lambda step, rows, length: (torch.empty(rows, step.pair.vocab),
                                                      torch.empty(rows, step.pair.vocab)))
    make, seen = gen._session, []

    def session(*args):
        s = make(*args)
        step = gen._step
        if step not in seen:  # a new step: capture from now on (until a capture fails)
            seen.append(step)
            step.replay, step.stream, step.mempool = True, torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        return s

    gen._session = session
    if side:
        gen.pair._side = torch.cuda.Stream()


def rows_never_end(ckpts, memory: str) -> JointGenerator:
    """A generator whose tokenizer has no EOS: every row runs every step."""
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.375, knn_temp=0.75, cuda_graphs=False)
    no_eos = copy.deepcopy(gen.tokenizer)
    no_eos.eos_token = None
    return JointGenerator(gen.base, gen.memory, no_eos, lmbda=0.375, knn_temp=0.75, cuda_graphs=False)


# greedy, and seeded (each draws from its call's own generator, outside the graph)
FAKE_REQUESTS = [{}, {"temperature": 1.25, "top_k": 40, "seed": 5},
                 {"temperature": [0.0, 0.5, 1.25, 1.0], "top_p": 0.75, "min_p": 0.0625, "seed": 9}]


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_fake_captured_graph_replays_give_the_eager_tokens(ckpts, memory, monkeypatch):
    gen = rows_never_end(ckpts, memory)
    want = [gen.generate(PROMPTS4, max_new_tokens=9, **r) for r in FAKE_REQUESTS]
    fake = FakeCuda(monkeypatch)
    fake_captured(gen, fake, side=memory == "decoder")
    got = [gen.generate(PROMPTS4, max_new_tokens=9, **r) for r in FAKE_REQUESTS]
    for g, w, r in zip(got, want, FAKE_REQUESTS):
        assert g.token_ids == w.token_ids, r
        assert torch.allclose(flat(g.logprobs), flat(w.logprobs), atol=1e-4), r
    step = gen._step
    assert fake.captures == 1 and list(step.graphs) == [(4, 64)]  # captured at the first step, then replayed
    assert fake.graphs[0].replays == 3 * 8  # every step after the prefill's sample
    assert len(fake.graphs[0].generators) == 1 and fake.graphs[0].generators[0] is step.rng
    assert fake.current is fake.default
    begin = fake.log.index(("capture_begin", step.stream.name))
    assert ("wait_stream", step.stream.name, "default") in fake.log[:begin]  # the warm-up waits for the main stream
    assert ("wait_stream", "default", step.stream.name) in fake.log[:begin]  # and the main stream for it
    if memory == "decoder":  # the memory forks to the side stream and joins back, in the warm-up too
        assert ("wait_stream", gen.pair._side.name, step.stream.name) in fake.log[:begin]
        assert ("wait_event", step.stream.name, gen.pair._side.name) in fake.log[:begin]


def test_a_failed_fake_capture_decodes_eagerly_from_then_on(ckpts, monkeypatch, caplog):
    gen = rows_never_end(ckpts, "decoder")
    kw = {"max_new_tokens": 7, "temperature": 1.25, "top_p": 0.875, "seed": 3}
    want4, want2 = gen.generate(PROMPTS4, **kw), gen.generate(PROMPTS[:2], **kw)
    fake = FakeCuda(monkeypatch, fail_captures=[2])
    fake_captured(gen, fake)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got4 = gen.generate(PROMPTS4, **kw)  # bucket 4: captured and replayed
        assert (4, 64) in gen._step.graphs
        got2 = gen.generate(PROMPTS[:2], **kw)  # bucket 2: its capture fails; this step and all later ones are eager
        again4 = gen.generate(PROMPTS4, **kw)
    assert got4.token_ids == again4.token_ids == want4.token_ids
    assert got2.token_ids == want2.token_ids
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "capture failed" in records[0].getMessage()
    assert not gen._step.replay and not gen._step.graphs and fake.captures == 2
    assert ("set_stream", "default") in fake.log and fake.current is fake.default  # not left on the capture stream


# -- the graphs themselves (CUDA only) ----------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_gens(ckpts):
    """float32 generators on CUDA (so that eager and graph agree to the last bit that matters), with and without
    graphs."""
    if not torch.cuda.is_available() or not ops.compiled_available():
        pytest.skip("needs CUDA and the compiled extension")
    return {(m, g): JointGenerator.from_pretrained(ckpts["base"], ckpts[m], lmbda=0.4, knn_temp=0.8, device="cuda",
                                                   dtype=torch.float32, cuda_graphs=g)
            for m in ("decoder", "mlp") for g in (False, True)}


@cuda
@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_graph_gives_eager_greedy_tokens_and_seeded_samples(cuda_gens, memory):
    eager, graphed = cuda_gens[memory, False], cuda_gens[memory, True]
    for kw in ({}, {"temperature": 0.9, "top_p": 0.95, "seed": 5}):
        want = eager.generate(PROMPTS, max_new_tokens=12, **kw)
        got = graphed.generate(PROMPTS, max_new_tokens=12, **kw)
        assert got.token_ids == want.token_ids, kw
        assert torch.allclose(flat(got.logprobs), flat(want.logprobs), atol=1e-4), kw
    assert graphed._step.replay and (4, 64) in graphed._step.graphs  # the steps did replay a graph
    a = graphed.generate(PROMPTS, max_new_tokens=12, temperature=0.9)
    b = graphed.generate(PROMPTS, max_new_tokens=12, temperature=0.9)
    assert a.token_ids != b.token_ids  # unseeded replays draw fresh numbers


@cuda
def test_replay_after_changing_per_row_params(cuda_gens):
    eager, graphed = cuda_gens["decoder", False], cuda_gens["decoder", True]
    requests = [{"lmbda": [0.0, 1.0, 0.4], "temperature": 0.0},
                {"lmbda": [0.9, 0.1, 0.4], "temperature": [0.0, 1.1, 0.6], "top_k": [0, 5, 40], "seed": 2},
                {"lmbda": 0.4, "temperature": [1.5, 0.0, 0.3], "min_p": [0.1, 0.0, 0.0], "seed": 3}]
    want = [eager.generate(PROMPTS, max_new_tokens=10, **r).token_ids for r in requests]
    got = [graphed.generate(PROMPTS, max_new_tokens=10, **r).token_ids for r in requests]
    assert got == want


@cuda
def test_a_failed_capture_decodes_eagerly_from_then_on(ckpts, monkeypatch, caplog):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, device="cuda",
                                         dtype=torch.float32)
    want = gen.generate(PROMPTS, max_new_tokens=8)
    gen._step = None
    sample_rows = ops.sample_rows

    def sync_under_capture(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.zeros(1, device="cuda").item()  # a sync: not permitted while capturing, so the capture fails
        return sample_rows(*args, **kwargs)

    monkeypatch.setattr(ops, "sample_rows", sync_under_capture)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got = gen.generate(PROMPTS, max_new_tokens=8)
        again = gen.generate(PROMPTS, max_new_tokens=8)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "capture failed" in records[0].getMessage()
    assert not gen._step.replay and not gen._step.graphs
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert got.token_ids == again.token_ids == want.token_ids


def allocated_after_deferred_frees() -> int:
    """Allocated bytes once the frees that record_stream deferred have happened."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


@cuda
def test_gpu_memory_does_not_grow_over_1000_generate_calls(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, device="cuda")
    for i in range(30):  # capture every bucket the loop below uses
        gen.generate(PROMPTS[: 1 + i % 3], max_new_tokens=6, temperature=0.8, seed=i)
    assert gen._step.replay
    before = allocated_after_deferred_frees()
    for i in range(1000):
        gen.generate(PROMPTS[: 1 + i % 3], max_new_tokens=6, temperature=0.8, seed=i)
    assert allocated_after_deferred_frees() <= before + 2**20  # a leak of one small tensor per call would be 1000x
