"""CUDA-graph decode: bucket and padding bookkeeping and the fallback decision on the CPU; the graphs on CUDA.

On the CPU, DecodeGraphs(replay=False) runs the very static-buffer step the graph
captures (padded rows, pooled caches, the parameter table, bucket shrinking),
and must give the eager path's tokens. Over fake CUDA streams and graphs
(tests/fake_cuda.py), DecodeGraphs(replay=True) runs its capture path too: the
warm-up and its undoing, the generator registration, the failed-capture fallback.
"""

from __future__ import annotations

import copy
import logging
import math
import types

import pytest
import torch
from fake_cuda import FakeCuda
from finish_cases import tokenizer_with_eos
from test_generator import finished_row_turns_nan

from memdec_fast import JointGenerator, ops, reference
from memdec_fast.generation import cuda_graph
from memdec_fast.generation.cuda_graph import (
    DecodeGraphs,
    GraphSession,
    batch_bucket,
    fill_param_table,
    length_bucket,
    pad_index,
    pad_rows,
    unsupported_reason,
)
from memdec_fast.models import GPT2, GPT2Config, GPT2Runner, MLPMemory

PROMPTS = ["the quick brown fox", "a plug", "memory decoders give a base"]
LOGGER = cuda_graph.__name__
cuda = pytest.mark.skipif(not torch.cuda.is_available() or not ops.compiled_available(),
                          reason="needs CUDA and the compiled extension")
compiled = pytest.mark.skipif(not ops.compiled_available(), reason="needs the compiled extension")


# -- buckets, padding, the parameter table ------------------------------------------------------

def test_batch_bucket_is_the_next_power_of_two_up_to_the_limit():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64, 65, 256)] == [1, 2, 4, 4, 8, 8, 16, 64, 64, 128, 256]
    assert batch_bucket(257) is None
    assert batch_bucket(65, max_batch=64) is None
    assert batch_bucket(64, max_batch=64) == 64
    with pytest.raises(ValueError, match="rows"):
        batch_bucket(0)


def test_length_bucket_is_a_power_of_two_at_least_64_and_at_most_the_context():
    assert [length_bucket(n, 1024) for n in (1, 64, 65, 383, 384, 513, 1024)] == [64, 64, 128, 512, 512, 1024, 1024]
    assert length_bucket(600, 1000) == 1000  # the context caps the bucket even when it is no power of two
    assert length_bucket(10, 32) == 32
    with pytest.raises(ValueError, match="slots"):
        length_bucket(1025, 1024)


def test_padding_repeats_the_last_row_and_unpadding_returns_the_rows():
    assert pad_index(3, 8) == [0, 1, 2, 2, 2, 2, 2, 2]
    assert pad_index(4, 4) == [0, 1, 2, 3]
    x = torch.arange(15).view(5, 3)
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 3)
    assert torch.equal(padded[:5], x)
    assert torch.equal(padded[5:], x[4].expand(3, 3))
    with pytest.raises(ValueError, match="rows"):
        pad_index(5, 4)


def test_param_table_is_filled_in_place_per_row_and_padded():
    table = torch.full((4, 7), -1.0)
    address = table.data_ptr()
    fill_param_table(table, {"lmbda": 0.25, "temperature": torch.tensor([0.0, 0.7, 1.3]), "top_k": 50}, rows=3)
    cols = {name: table[:, i].tolist() for i, name in enumerate(ops.ROW_PARAM_COLUMNS)}
    assert cols["lmbda"] == [0.25] * 4
    assert cols["temperature"] == pytest.approx([0.0, 0.7, 1.3, 1.3])  # the padding row repeats row 2
    assert cols["top_k"] == [50.0] * 4
    assert cols["knn_temp"] == cols["base_temp"] == cols["top_p"] == [1.0] * 4  # defaults
    assert cols["min_p"] == [0.0] * 4
    # a new request in the same bucket rewrites every row of the same tensor (the graph holds its address)
    fill_param_table(table, {"lmbda": torch.tensor([0.9]), "top_p": 0.5}, rows=1)
    assert table.data_ptr() == address
    assert torch.equal(table, ops.pack_row_params(1, "cpu", lmbda=0.9, top_p=0.5).expand(4, 7))


# -- the fallback decision ----------------------------------------------------------------------

def tiny_gpt2_runner() -> GPT2Runner:
    return GPT2Runner(GPT2(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)))


def test_unsupported_reasons():
    gpu, runner = torch.device("cuda"), tiny_gpt2_runner()
    hf = types.SimpleNamespace(device=gpu)
    mlp = MLPMemory(GPT2Config(vocab_size=11, n_embd=8, n_layer=1))
    assert unsupported_reason(gpu, runner, runner, reference=False, compiled=True) is None
    assert unsupported_reason(gpu, runner, mlp, reference=False, compiled=True) is None
    assert unsupported_reason(gpu, runner, None, reference=False, compiled=True) is None
    assert "cpu" in unsupported_reason(torch.device("cpu"), runner, runner, reference=False, compiled=True)
    assert "reference" in unsupported_reason(gpu, runner, runner, reference=True, compiled=True)
    assert "compiled extension" in unsupported_reason(gpu, runner, runner, reference=False, compiled=False)
    assert "base runs in transformers" in unsupported_reason(gpu, hf, runner, reference=False, compiled=True)
    assert "memory runs in transformers" in unsupported_reason(gpu, runner, hf, reference=False, compiled=True)


def test_unsupported_cuda_setup_logs_one_warning(caplog, monkeypatch):
    base = types.SimpleNamespace(device=torch.device("cuda"))  # a transformers-style runner; nothing touches CUDA
    monkeypatch.setattr(ops, "compiled_available", lambda: True)  # so that the models are the reason, built or not
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert cuda_graph.decode_graphs(base, base, 10, 64, None) is None
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "decoding eagerly" in records[0].getMessage() and "transformers" in records[0].getMessage()


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_cpu_generator_falls_back_with_one_log_line_and_unchanged_output(ckpts, memory, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        on = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "not CUDA" in records[0].getMessage()
    assert on._graphs is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        off = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4, cuda_graphs=False)
    assert not [r for r in caplog.records if r.name == LOGGER]  # disabled on purpose: nothing to say
    a = on.generate(PROMPTS, max_new_tokens=6, temperature=0.9, seed=3)
    b = off.generate(PROMPTS, max_new_tokens=6, temperature=0.9, seed=3)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


# -- the static-buffer step, without capture, on the CPU ------------------------------------------

def flat(logprobs: list[list[float]]) -> torch.Tensor:
    return torch.tensor([lp for row in logprobs for lp in row])


def with_static_step(gen: JointGenerator, replay: bool) -> DecodeGraphs:
    gen._graphs = DecodeGraphs(gen.base, gen.memory, gen.vocab, gen._context, gen._side, replay=replay)
    return gen._graphs


def shrinking_stop(gen: JointGenerator, prompts: list[str], steps: int) -> int:
    """A stop token that ends some rows early, found from an eager run, so that the batch shrinks."""
    eager = gen.generate(prompts, max_new_tokens=steps)
    for t in sorted({t for ids in eager.token_ids for t in ids[:-1]}):
        ended = [t in ids[:-1] for ids in eager.token_ids]
        if 0 < ended.count(False) <= len(prompts) // 2:
            return t
    pytest.skip("no token ends the right rows early for these random weights")


@compiled
@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_static_buffer_step_equals_eager_with_padding_and_shrinking(ckpts, memory, monkeypatch):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4, knn_temp=0.8, cuda_graphs=False)
    prompts = PROMPTS + ["héllo", "lazy dog"]  # 5 rows: bucket 8, three padding rows
    stop = shrinking_stop(gen, prompts, 10)
    want_greedy = gen.generate(prompts, max_new_tokens=10, stop=stop)
    want_sampled = gen.generate(prompts, max_new_tokens=10, temperature=[0.0, 0.8, 1.2, 0.5, 1.0], top_k=20,
                                seed=11)
    shrinks, keep_rows = [], GraphSession.keep_rows

    def spy(self: GraphSession, rows: torch.Tensor) -> None:
        shrinks.append((self.entry.tokens.shape[0], rows.numel()))
        keep_rows(self, rows)

    monkeypatch.setattr(GraphSession, "keep_rows", spy)
    graphs = with_static_step(gen, replay=False)
    got = gen.generate(prompts, max_new_tokens=10, stop=stop)
    assert got.token_ids == want_greedy.token_ids
    assert torch.allclose(flat(got.logprobs), flat(want_greedy.logprobs), atol=1e-4)
    assert got.finish_reasons == want_greedy.finish_reasons
    assert shrinks and all(batch_bucket(n) < bucket for bucket, n in shrinks)
    assert (8, 64) in graphs.entries  # 5 rows padded to 8; 10 slots rounded up to 64
    got = gen.generate(prompts, max_new_tokens=10, temperature=[0.0, 0.8, 1.2, 0.5, 1.0], top_k=20, seed=11)
    assert got.token_ids == want_sampled.token_ids


@compiled
def test_static_buffer_sessions_reuse_their_buffers(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    graphs = with_static_step(gen, replay=False)
    gen.generate(PROMPTS, max_new_tokens=4)
    entry = graphs.entries[4, 64]
    pool = graphs.pools[0].data_ptr()
    gen.generate(PROMPTS[:2] + ["héllo", "lazy dog"], max_new_tokens=5, lmbda=[0.0, 1.0, 0.5, 0.2])
    assert graphs.entries[4, 64] is entry and graphs.pools[0].data_ptr() == pool
    assert entry.table[:, 0].tolist() == pytest.approx([0.0, 1.0, 0.5, 0.2])
    gen.generate(PROMPTS + ["héllo", "lazy dog"], max_new_tokens=4)  # 8 x 64 slots: the pools grow
    assert graphs.capacity == 8 * 64
    assert list(graphs.entries) == [(8, 64)]  # every view of the old pools is gone


@compiled
def test_growing_the_pools_frees_the_old_ones(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    graphs = with_static_step(gen, replay=False)
    gen.generate(PROMPTS, max_new_tokens=4)  # 4 x 64 slots; the runners stay bound to views of the pools
    old = {pool.untyped_storage().data_ptr() for pool in graphs.pools}
    graphs.entry(8, 64)
    caches = [b.attn.kv_cache for r in graphs.runners for b in r.model.h if b.attn.kv_cache is not None]
    assert not {t.untyped_storage().data_ptr() for c in caches for t in (c.k, c.v)} & old  # nothing keeps them alive
    want = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    assert gen.generate(PROMPTS, max_new_tokens=4).token_ids == want.generate(PROMPTS, max_new_tokens=4).token_ids


@compiled
def test_sessions_do_not_read_an_earlier_requests_nan_from_the_pools(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    want = gen.generate(PROMPTS, max_new_tokens=6)
    graphs = with_static_step(gen, replay=False)
    gen.generate(PROMPTS, max_new_tokens=6)
    with torch.inference_mode():
        for pool in graphs.pools:
            pool.fill_(math.nan)  # what an earlier request's NaN rows could leave in the slots beyond the prompt
    got = gen.generate(PROMPTS, max_new_tokens=6)
    assert got.token_ids == want.token_ids


@compiled
def test_nan_logits_of_a_finished_row_are_not_fed_back_into_the_static_step(ckpts, monkeypatch):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    stop_id, want = finished_row_turns_nan(gen, PROMPTS, 6, monkeypatch)
    with_static_step(gen, replay=False)
    assert gen.generate(PROMPTS, max_new_tokens=6, stop=stop_id).token_ids == want


@compiled
def test_out_of_memory_for_the_caches_decodes_that_request_eagerly(ckpts, monkeypatch, caplog):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    want = gen.generate(PROMPTS, max_new_tokens=6)
    graphs = with_static_step(gen, replay=False)
    entry = DecodeGraphs.entry

    def out_of_memory(self: DecodeGraphs, bucket: int, slots: int):
        entry(self, bucket, slots)  # the pools are allocated; say the last small buffer did not fit
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(DecodeGraphs, "entry", out_of_memory)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got = gen.generate(PROMPTS, max_new_tokens=6)
    assert got.token_ids == want.token_ids
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "decoding this request eagerly" in records[0].getMessage()
    assert graphs.pools == [] and graphs.entries == {} and graphs.capacity == 0
    monkeypatch.undo()
    assert gen.generate(PROMPTS, max_new_tokens=6).token_ids == want.token_ids  # the next request gets its pools
    assert graphs.capacity == 4 * 64


# -- the capture path, over fake CUDA streams and graphs, on the CPU -------------------------------------

EXACT = {"lmbda": 0.375, "knn_temp": 0.75}  # exact in float32: the [B, 7] table and the eager scalars agree
PROMPTS4 = PROMPTS + ["héllo"]  # a full bucket: no padding rows


def reference_sample_rows(base_logits, mem_logits, table, generator=None):
    """ops.sample_rows without the extension: the reference on the table's columns, as the engine's step does it."""
    cols = dict(zip(ops.ROW_PARAM_COLUMNS, table.unbind(1)))
    cols["top_k"] = cols["top_k"].long()
    return reference.sample(base_logits, mem_logits, **cols, generator=generator)


def rows_never_end(ckpts, memory: str) -> JointGenerator:
    """A generator whose tokenizer has no EOS: every row runs every step, so that the batch never shrinks.

    The reference sampler draws for every row of the bucket, padding included; a full bucket that never shrinks
    draws what the eager loop draws, token for token, with or without the extension.
    """
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], **EXACT, cuda_graphs=False)
    no_eos = copy.deepcopy(gen.tokenizer)
    no_eos.eos_token = None
    return JointGenerator(gen.base, gen.memory, no_eos, **EXACT, cuda_graphs=False)


def fake_captured_graphs(gen: JointGenerator, fake: FakeCuda, monkeypatch, side: bool = False) -> DecodeGraphs:
    """gen decoding through DecodeGraphs(replay=True) whose step is captured and replayed by `fake`."""
    fake.capture_calls_of(DecodeGraphs, "step")
    if not ops.compiled_available():
        monkeypatch.setattr(ops, "sample_rows", reference_sample_rows)
    gen._graphs = DecodeGraphs(gen.base, gen.memory, gen.vocab, gen._context, torch.cuda.Stream() if side else None,
                               replay=True)
    return gen._graphs


# the first request is captured, so that the warm-up's draw must be undone; the others only replay
FAKE_REQUESTS = [{"temperature": 1.25, "top_k": 40, "seed": 5}, {},
                 {"temperature": [0.0, 0.5, 1.25, 1.0], "top_p": 0.75, "min_p": 0.0625, "seed": 9}]


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_fake_captured_graph_replays_give_the_eager_tokens(ckpts, memory, monkeypatch):
    gen = rows_never_end(ckpts, memory)
    want = [gen.generate(PROMPTS4, max_new_tokens=9, **r) for r in FAKE_REQUESTS]
    fake = FakeCuda(monkeypatch)
    graphs = fake_captured_graphs(gen, fake, monkeypatch, side=memory == "decoder")
    got = [gen.generate(PROMPTS4, max_new_tokens=9, **r) for r in FAKE_REQUESTS]
    for g, w, r in zip(got, want, FAKE_REQUESTS):
        assert g.token_ids == w.token_ids, r
        assert torch.allclose(flat(g.logprobs), flat(w.logprobs), atol=1e-4), r
    entry = graphs.entries[4, 64]
    assert fake.captures == 1 and entry.graph is fake.graphs[0]  # captured at the first step, then only replayed
    assert entry.graph.replays == 3 * 8  # every step after the prefill's sample
    assert len(entry.graph.generators) == 1 and entry.graph.generators[0] is graphs.rng  # sessions re-seed it
    assert fake.current is fake.default
    begin = fake.log.index(("capture_begin", graphs.stream.name))
    assert ("wait_stream", graphs.stream.name, "default") in fake.log[:begin]  # the warm-up waits for the main stream
    assert ("wait_stream", "default", graphs.stream.name) in fake.log[:begin]  # and the main stream for it
    if memory == "decoder":  # the memory's decode forks to the side stream and joins back, in the warm-up too
        assert ("wait_stream", graphs.side.name, graphs.stream.name) in fake.log[:begin]
        assert ("wait_event", graphs.stream.name, graphs.side.name) in fake.log[:begin]


def test_a_failed_fake_capture_decodes_eagerly_from_then_on(ckpts, monkeypatch, caplog):
    gen = rows_never_end(ckpts, "decoder")
    kw = {"max_new_tokens": 7, "temperature": 1.25, "top_p": 0.875, "seed": 3}
    want4, want2 = gen.generate(PROMPTS4, **kw), gen.generate(PROMPTS[:2], **kw)
    fake = FakeCuda(monkeypatch, fail_captures=[2])
    graphs = fake_captured_graphs(gen, fake, monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got4 = gen.generate(PROMPTS4, **kw)  # bucket 4: captured and replayed
        assert graphs.entries[4, 64].graph is not None
        got2 = gen.generate(PROMPTS[:2], **kw)  # bucket 2: its capture fails; this step and all later ones are eager
        again4 = gen.generate(PROMPTS4, **kw)
    assert got4.token_ids == again4.token_ids == want4.token_ids
    assert got2.token_ids == want2.token_ids
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and "capture failed" in records[0].getMessage()
    assert not graphs.replay and all(e.graph is None for e in graphs.entries.values())
    assert fake.captures == 2
    assert ("set_stream", "default") in fake.log and fake.current is fake.default  # not left on the capture stream


def test_a_fake_capture_of_an_eos_tokenizer_shrinks_and_matches_eager(ckpts, monkeypatch):
    # rows that end early leave the batch: the smaller bucket is captured in its turn
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["mlp"], **EXACT, cuda_graphs=False)
    stop = shrinking_stop(gen, PROMPTS4, 10)
    gen = JointGenerator(gen.base, gen.memory, tokenizer_with_eos(gen.tokenizer, stop), **EXACT, cuda_graphs=False)
    want = gen.generate(PROMPTS4, max_new_tokens=10)
    fake = FakeCuda(monkeypatch)
    graphs = fake_captured_graphs(gen, fake, monkeypatch)
    got = gen.generate(PROMPTS4, max_new_tokens=10)
    assert got.token_ids == want.token_ids and got.finish_reasons == want.finish_reasons
    assert fake.captures == len(graphs.entries) >= 2 and all(e.graph is not None for e in graphs.entries.values())


# -- the graphs themselves (CUDA only) ----------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_gens(ckpts):
    """float32 generators on CUDA (so that eager and graph agree to the last bit that matters), graphs off.

    Their tokenizer has no EOS, so that every row runs every step in the bucket it started in.
    """
    if not torch.cuda.is_available() or not ops.compiled_available():
        pytest.skip("needs CUDA and the compiled extension")
    gens = {m: JointGenerator.from_pretrained(ckpts["base"], ckpts[m], lmbda=0.4, knn_temp=0.8, device="cuda",
                                              dtype=torch.float32, cuda_graphs=False)
            for m in ("decoder", "mlp")}
    no_eos = copy.deepcopy(gens["decoder"].tokenizer)
    no_eos.eos_token = None
    return {m: JointGenerator(g.base, g.memory, no_eos, lmbda=0.4, knn_temp=0.8, cuda_graphs=False)
            for m, g in gens.items()}


@cuda
@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_graph_gives_eager_greedy_tokens_and_seeded_samples(cuda_gens, memory):
    gen = cuda_gens[memory]
    gen._graphs = None
    want_greedy = gen.generate(PROMPTS, max_new_tokens=12)
    want_sampled = gen.generate(PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=5)
    graphs = with_static_step(gen, replay=True)
    try:
        got = gen.generate(PROMPTS, max_new_tokens=12)
        assert graphs.entries[4, 64].graph is not None  # the steps did replay a graph
        assert got.token_ids == want_greedy.token_ids
        assert torch.allclose(flat(got.logprobs), flat(want_greedy.logprobs),
                              atol=1e-4)
        got = gen.generate(PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=5)
        assert got.token_ids == want_sampled.token_ids
        again = gen.generate(PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=5)
        assert again.token_ids == got.token_ids  # re-seeding reaches the graph's generator
        other = gen.generate(PROMPTS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=6)
        assert other.token_ids != got.token_ids  # replays draw fresh numbers
    finally:
        gen._graphs = None


@cuda
def test_replay_after_changing_per_row_params(cuda_gens):
    gen = cuda_gens["decoder"]
    gen._graphs = None
    requests = [{"lmbda": [0.0, 1.0, 0.4], "temperature": 0.0},
                {"lmbda": [0.9, 0.1, 0.4], "temperature": [0.0, 1.1, 0.6], "top_k": [0, 5, 40], "seed": 2},
                {"lmbda": 0.4, "temperature": [1.5, 0.0, 0.3], "min_p": [0.1, 0.0, 0.0], "seed": 3}]
    want = [gen.generate(PROMPTS, max_new_tokens=10, **r).token_ids for r in requests]
    graphs = with_static_step(gen, replay=True)
    try:
        got = [gen.generate(PROMPTS, max_new_tokens=10, **requests[0]).token_ids]
        graph = graphs.entries[4, 64].graph
        got += [gen.generate(PROMPTS, max_new_tokens=10, **r).token_ids for r in requests[1:]]
        assert graphs.entries[4, 64].graph is graph  # one graph, replayed with three parameter tables
        assert got == want
    finally:
        gen._graphs = None


@cuda
def test_a_failed_capture_decodes_eagerly_from_then_on(cuda_gens, monkeypatch, caplog):
    gen = cuda_gens["decoder"]
    gen._graphs = None
    want = gen.generate(PROMPTS, max_new_tokens=8, temperature=0.9, seed=5)
    sample_rows = ops.sample_rows

    def sync_under_capture(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.zeros(1, device="cuda").item()  # a sync: not permitted while capturing, so the capture fails
        return sample_rows(*args, **kwargs)

    monkeypatch.setattr(ops, "sample_rows", sync_under_capture)
    graphs = with_static_step(gen, replay=True)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            got = gen.generate(PROMPTS, max_new_tokens=8, temperature=0.9, seed=5)
            again = gen.generate(PROMPTS, max_new_tokens=8, temperature=0.9, seed=5)
        records = [r for r in caplog.records if r.name == LOGGER]
        assert len(records) == 1 and "capture failed" in records[0].getMessage()
        assert not graphs.replay and all(e.graph is None for e in graphs.entries.values())
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        assert got.token_ids == again.token_ids == want.token_ids
    finally:
        gen._graphs = None


def allocated_after_deferred_frees() -> int:
    """Allocated bytes once the frees that record_stream deferred have happened."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


@cuda
def test_gpu_memory_does_not_grow_over_1000_generate_calls(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, device="cuda")
    assert gen._graphs is not None
    for i in range(30):  # capture every bucket the loop below uses
        gen.generate(PROMPTS[: 1 + i % 3], max_new_tokens=6, temperature=0.8, seed=i)
    before = allocated_after_deferred_frees()
    for i in range(1000):
        gen.generate(PROMPTS[: 1 + i % 3], max_new_tokens=6, temperature=0.8, seed=i)
    assert allocated_after_deferred_frees() <= before + 2**20  # a leak of one small tensor per call would be 1000x
