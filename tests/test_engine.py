"""Engine: continuous batching against JointGenerator alone, on tiny random checkpoints (CPU, float32).

Every wait is bounded (WAIT seconds); every loop is bounded in count.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time

import pytest
import torch
from conftest import build_tokenizer, save_gpt2
from fake_cuda import FakeCuda
from finish_cases import across_tokens, at_last_token, tokenizer_with_eos

from memdec_fast import JointGenerator, ops
from memdec_fast.engine import (
    Engine,
    EngineClosed,
    EngineOverloaded,
    InvalidArgument,
    RequestFailed,
    RequestOutput,
    StreamDelta,
)
from memdec_fast.engine import engine as engine_module
from memdec_fast.engine.step import ModelStep, batch_bucket

WAIT = 30.0
PROMPTS = ["the quick brown fox", "a plug", "memory decoders give a base", "héllo", "the lazy dog jumps over the fox"]


def wait_until(cond, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def load(ckpts, memory: str) -> JointGenerator:
    return JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4, knn_temp=0.8, cuda_graphs=False)


@pytest.fixture(scope="module")
def refs(ckpts):
    """JointGenerator per memory type: the reference each request must equal alone."""
    return {m: load(ckpts, m) for m in ("decoder", "mlp")}


@pytest.fixture(scope="module")
def long_ckpts(ckpts, tmp_path_factory, tokenizer):
    """A base with room for 256 positions, and the MLP Memory (no context of its own): requests that run long."""
    base = save_gpt2(tmp_path_factory.mktemp("long") / "base", tokenizer, seed=5, n_positions=256)
    return {"base": base, "mlp": ckpts["mlp"]}


@pytest.fixture(scope="module")
def long_ref(long_ckpts):
    return load(long_ckpts, "mlp")


def tokens_per_request(engine: Engine) -> dict[str, int]:
    """Tokens each request got, from the step trace (its first comes with its last prefill chunk)."""
    counts: dict[str, int] = {}
    for step in engine.trace:
        for rid in step["decode"]:
            counts[rid] = counts.get(rid, 1) + 1
    return counts


@pytest.fixture(scope="module")
def engines(ckpts):
    """Small engines: 3 slots, prefill chunks of 4 tokens (most prompts take several steps)."""
    out = {m: Engine(load(ckpts, m), max_batch=3, max_queue=8, prefill_chunk=4) for m in ("decoder", "mlp")}
    yield out
    for e in out.values():
        e.close(timeout=WAIT)


def assert_equals_alone(out: RequestOutput, ref: JointGenerator, prompt, **kw) -> None:
    alone = ref.generate(prompt, **kw)
    assert out.token_ids == alone.token_ids[0]
    assert out.text == alone.texts[0]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(alone.logprobs[0]), atol=1e-4, rtol=0)
    assert out.finish_reason == alone.finish_reasons[0]


# -- equality with JointGenerator alone ----------------------------------------------------------

@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_requests_joining_and_leaving_mid_batch_equal_generate_alone(engines, refs, memory):
    engine, ref = engines[memory], refs[memory]
    kws = [{"max_new_tokens": 12}, {"max_new_tokens": 3}, {"max_new_tokens": 9, "stop": "o"},
           {"max_new_tokens": 6}, {"max_new_tokens": 10, "lmbda": 0.9}]
    first, done = len(engine.trace), engine.stats["tokens"]
    futs = [engine.submit(PROMPTS[0], **kws[0]), engine.submit(PROMPTS[1], **kws[1])]
    wait_until(lambda: engine.stats["tokens"] >= done + 2)  # the others join a running batch
    futs += [engine.submit(p, **kw) for p, kw in zip(PROMPTS[2:], kws[2:])]  # 5 requests, 3 slots: some wait
    outs = [f.result(WAIT) for f in futs]
    for prompt, kw, out in zip(PROMPTS, kws, outs):
        assert_equals_alone(out, ref, prompt, **kw)
        assert out.prompt_tokens == len(ref.tokenizer.encode(prompt))
    steps = list(engine.trace)[first:]
    batches = [set(s["decode"]) for s in steps if s["decode"]]
    assert max(len(b) for b in batches) >= 2
    # someone joined while others were decoding, and someone left while others went on
    assert any(b - a and a & b for a, b in itertools.pairwise(batches))
    assert any(a - b and a & b for a, b in itertools.pairwise(batches))


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_prompts_admitted_together_prefill_in_one_padded_forward(ckpts, refs, memory):
    kws = [{"max_new_tokens": 5}, {"max_new_tokens": 8}, {"max_new_tokens": 3}, {"max_new_tokens": 6}]
    with Engine(load(ckpts, memory), max_batch=4, prefill_chunk=64) as engine:
        with engine._sched.cond:  # all four wait until the loop admits them at once
            futs = [engine.submit(p, **kw) for p, kw in zip(PROMPTS, kws)]
        outs = [f.result(WAIT) for f in futs]
        first = next(s for s in engine.trace if s["prefill"])
    assert sorted(rid for rid, _, _ in first["prefill"]) == sorted(o.request_id for o in outs)
    for prompt, kw, out in zip(PROMPTS, kws, outs):
        assert_equals_alone(out, refs[memory], prompt, **kw)


def test_seeded_requests_reproduce_and_equal_generate_alone(engines, refs):
    engine, ref = engines["decoder"], refs["decoder"]
    kw = {"max_new_tokens": 10, "temperature": 1.3, "top_k": 40, "top_p": 0.95}
    futs = [
        engine.submit(PROMPTS[0], seed=7, **kw),
        engine.submit(PROMPTS[1], **kw),  # unseeded: shares the batched sampler call
        engine.submit(PROMPTS[2], max_new_tokens=10),  # greedy
        engine.submit(PROMPTS[3], seed=8, **kw),
    ]
    outs = [f.result(WAIT) for f in futs]
    assert_equals_alone(outs[0], ref, PROMPTS[0], seed=7, **kw)
    assert_equals_alone(outs[2], ref, PROMPTS[2], max_new_tokens=10)
    assert_equals_alone(outs[3], ref, PROMPTS[3], seed=8, **kw)
    again = engine.submit(PROMPTS[0], seed=7, **kw).result(WAIT)
    assert again.token_ids == outs[0].token_ids
    assert 1 <= len(outs[1].token_ids) <= 10  # unseeded: it may draw EOS
    assert outs[1].finish_reason in ("length", "eos")


def test_stop_token_id_finishes_with_stop_and_eos_with_eos(engines, refs, ckpts):
    engine, ref = engines["decoder"], refs["decoder"]
    greedy = ref.generate(PROMPTS[0], max_new_tokens=8).token_ids[0]
    stop_id = greedy[3]
    out = engine.submit(PROMPTS[0], max_new_tokens=8, stop=[stop_id]).result(WAIT)
    assert out.token_ids == greedy[: greedy.index(stop_id) + 1]
    assert out.finish_reason == "stop"
    tok = build_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(stop_id)  # a tokenizer whose EOS the models emit
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, knn_temp=0.8, tokenizer=tok)
    with Engine(gen, max_batch=2) as eos_engine:
        out = eos_engine.submit(PROMPTS[0], max_new_tokens=8).result(WAIT)
    assert out.finish_reason == "eos"
    assert_equals_alone(out, gen, PROMPTS[0], max_new_tokens=8)


def test_each_stop_condition_at_the_last_token_reports_the_generators_reason(engines, refs, ckpts):
    # the token that reaches max_new_tokens also stops the request: "stop" / "eos", as JointGenerator says
    engine, ref = engines["decoder"], refs["decoder"]
    case = at_last_token(ref, PROMPTS)
    for stop in (None, [case.stop_id], case.stop_string):
        out = engine.submit(case.prompt, max_new_tokens=case.n, stop=stop).result(WAIT)
        assert len(out.token_ids) == case.n
        assert_equals_alone(out, ref, case.prompt, max_new_tokens=case.n, stop=stop)
        assert out.finish_reason == ("length" if stop is None else "stop")
    gen = JointGenerator(ref.base, ref.memory, tokenizer_with_eos(ref.tokenizer, case.stop_id), lmbda=0.4,
                         knn_temp=0.8, cuda_graphs=False)
    with Engine(gen, max_batch=2) as eos_engine:
        out = eos_engine.submit(case.prompt, max_new_tokens=case.n).result(WAIT)
        deltas = asyncio.run(asyncio.wait_for(collect(eos_engine, case.prompt, max_new_tokens=case.n), WAIT))
    assert out.finish_reason == deltas[-1].finish_reason == "eos"
    assert_equals_alone(out, gen, case.prompt, max_new_tokens=case.n)


async def collect(engine: Engine, prompt, **kw) -> list[StreamDelta]:
    return [d async for d in engine.stream(prompt, **kw)]


@pytest.mark.parametrize("width", [2, 3, 5])
def test_stream_holds_back_a_stop_string_begun_at_the_end_of_a_token(engines, refs, width):
    # the stop string's first width - 1 characters end a token: sent at once, they could not be taken back
    engine, ref = engines["mlp"], refs["mlp"]
    case = across_tokens(ref, PROMPTS, width=width)
    never = case.stop[:-1] + "\x00"  # the same prefix, never completed: held back while it might, then sent
    for stop, n in ((case.stop, 16), (never, case.at)):
        deltas = asyncio.run(asyncio.wait_for(collect(engine, case.prompt, max_new_tokens=n, stop=stop), WAIT))
        final = ref.generate(case.prompt, max_new_tokens=n, stop=stop).texts[0]
        sent = ""
        for d in deltas:
            sent += d.text
            assert final.startswith(sent), f"streamed {sent!r}, but the text is {final!r}"
        assert sent == final
        assert deltas[-1].finish_reason == ("stop" if stop == case.stop else "length")
    assert ref.generate(case.prompt, max_new_tokens=16, stop=case.stop).texts[0] == case.text_before_stop


# -- async API -----------------------------------------------------------------------------------

def test_async_generate_and_stream_equal_generate_alone(engines, refs):
    engine, ref = engines["mlp"], refs["mlp"]

    async def main():
        async def collect(prompt, **kw):
            return [d async for d in engine.stream(prompt, **kw)]

        return await asyncio.gather(
            engine.generate(PROMPTS[0], max_new_tokens=7),
            collect(PROMPTS[4], max_new_tokens=12, stop=" o"),
            collect(PROMPTS[3], max_new_tokens=9),
        )

    out, *streams = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert_equals_alone(out, ref, PROMPTS[0], max_new_tokens=7)
    for deltas, (prompt, kw) in zip(streams, [(PROMPTS[4], {"max_new_tokens": 12, "stop": " o"}),
                                              (PROMPTS[3], {"max_new_tokens": 9})]):
        assert all(isinstance(d, StreamDelta) for d in deltas)
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
        assert deltas[-1].finish_reason is not None
        alone = ref.generate(prompt, **kw)
        assert "".join(d.text for d in deltas) == alone.texts[0]
        assert [t for d in deltas for t in d.token_ids] == alone.token_ids[0]


def test_closing_a_stream_or_cancelling_generate_cancels_the_request(long_ckpts):
    with Engine(load(long_ckpts, "mlp"), max_batch=2, prefill_chunk=64) as engine:
        async def main():
            stream = engine.stream(PROMPTS[0], max_new_tokens=200, request_id="closed")
            async for _ in stream:
                break
            await stream.aclose()
            await asyncio.to_thread(wait_until, lambda: engine.num_running == 0)

            async for _ in engine.stream(PROMPTS[1], max_new_tokens=200, request_id="dropped"):
                break  # the iterator is dropped here
            await asyncio.to_thread(wait_until, lambda: engine.num_running == 0)

            task = asyncio.create_task(engine.generate(PROMPTS[2], max_new_tokens=200, request_id="cancelled"))
            await asyncio.to_thread(wait_until, lambda: tokens_per_request(engine).get("cancelled", 0) >= 3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(wait_until, lambda: engine.num_running == 0)

        asyncio.run(asyncio.wait_for(main(), WAIT))
        counts = tokens_per_request(engine)
        assert all(counts.get(rid, 0) < 200 for rid in ("closed", "dropped", "cancelled")), counts


# -- cancellation, failures, overload, close -----------------------------------------------------

def test_cancel_frees_the_slot_for_a_waiting_request(long_ckpts, long_ref):
    with Engine(load(long_ckpts, "mlp"), max_batch=1) as engine:
        long = engine.submit(PROMPTS[0], max_new_tokens=200)
        short = engine.submit(PROMPTS[1], max_new_tokens=5)
        wait_until(lambda: engine.stats["tokens"] >= 2)
        assert (engine.num_running, engine.num_waiting) == (1, 1)
        assert long.cancel()
        out = short.result(WAIT)
        assert_equals_alone(out, long_ref, PROMPTS[1], max_new_tokens=5)
        assert engine.stats["tokens"] < 200 + 5
        wait_until(lambda: engine.num_running == 0)


def test_a_request_with_nan_logits_fails_alone(ckpts, refs):
    ref = refs["decoder"]
    goods = [(PROMPTS[0], 10), (PROMPTS[2], 8)]
    used = {t for p, n in goods for t in ref.tokenizer.encode(p) + ref.generate(p, max_new_tokens=n).token_ids[0]}
    poison = next(t for t in range(len(ref.tokenizer)) if t not in used)
    gen = load(ckpts, "decoder")
    wte = gen.base.model.wte  # tied to the LM head: poison what it returns for one token, not its weight row
    embed = wte.forward
    wte.forward = lambda idx: embed(idx).masked_fill((idx == poison)[..., None], float("nan"))
    with Engine(gen, max_batch=3, prefill_chunk=4) as engine:
        futs = [engine.submit(goods[0][0], max_new_tokens=10),
                engine.submit([5, 6, poison, 7], max_new_tokens=10),
                engine.submit(goods[1][0], max_new_tokens=8)]
        with pytest.raises(RequestFailed, match="NaN"):
            futs[1].result(WAIT)
        for (prompt, n), fut in zip(goods, futs[::2]):
            assert_equals_alone(fut.result(WAIT), ref, prompt, max_new_tokens=n)
        # the failed request's slot is clean for the next one
        after = [engine.submit(p, max_new_tokens=6) for p in PROMPTS[:3]]
        for p, f in zip(PROMPTS[:3], after):
            assert_equals_alone(f.result(WAIT), ref, p, max_new_tokens=6)


def test_a_failing_step_runs_its_rows_alone_and_fails_only_the_failing_one(ckpts, refs, caplog):
    with Engine(load(ckpts, "decoder"), max_batch=2) as engine:
        decode_one = engine._step.decode_one

        def broken(*args):
            raise RuntimeError("boom: memdec_fast::sample_rows(Tensor base_logits, ...) internals")

        def one(slot, *args):
            if slot == 1:
                raise RuntimeError("boom")
            return decode_one(slot, *args)

        engine._step.decode, engine._step.decode_one = broken, one
        with caplog.at_level(logging.WARNING, logger="memdec_fast.engine.engine"):
            with engine._sched.cond:  # both run in the broken step
                futs = [engine.submit(p, max_new_tokens=5) for p in PROMPTS[:2]]
            assert_equals_alone(futs[0].result(WAIT), refs["decoder"], PROMPTS[0], max_new_tokens=5)
            with pytest.raises(RequestFailed, match="RuntimeError") as err:
                futs[1].result(WAIT)
        assert "internals" not in str(err.value)  # the op's signature stays in the log
        assert "running them one by one" in caplog.text and "internals" in caplog.text
        assert engine.num_running == 0 and engine.healthy
        engine._step.decode_one = decode_one
        assert_equals_alone(engine.submit(PROMPTS[2], max_new_tokens=6).result(WAIT), refs["decoder"], PROMPTS[2],
                            max_new_tokens=6)


def test_overload_raises_at_once(ckpts):
    with Engine(load(ckpts, "decoder"), max_batch=1, max_queue=2) as engine:
        with engine._sched.cond:  # hold the loop off, so that nothing leaves the queue meanwhile
            futs = [engine.submit(PROMPTS[0], max_new_tokens=2) for _ in range(2)]
            t0 = time.monotonic()
            with pytest.raises(EngineOverloaded):
                engine.submit(PROMPTS[0], max_new_tokens=2)
            assert time.monotonic() - t0 < 1.0
            assert engine.num_waiting == 2
        assert all(len(f.result(WAIT).token_ids) == 2 for f in futs)


def test_close_drains_then_refuses(ckpts):
    engine = Engine(load(ckpts, "decoder"), max_batch=2)
    futs = [engine.submit(p, max_new_tokens=6) for p in PROMPTS]
    engine.close()
    assert [len(f.result(0).token_ids) for f in futs] == [6] * len(PROMPTS)
    with pytest.raises(EngineClosed):
        engine.submit(PROMPTS[0])
    with pytest.raises(EngineClosed):
        engine.stream(PROMPTS[0])
    engine.close()  # idempotent


def test_close_with_a_timeout_fails_what_is_left(long_ckpts):
    engine = Engine(load(long_ckpts, "mlp"), max_batch=1)
    futs = [engine.submit(PROMPTS[0], max_new_tokens=200) for _ in range(3)]
    wait_until(lambda: engine.stats["tokens"] >= 1)
    t0 = time.monotonic()
    engine.close(timeout=0.01)
    assert time.monotonic() - t0 < WAIT
    assert not engine._thread.is_alive()
    errors = [f.exception(0) for f in futs]
    assert any(isinstance(e, EngineClosed) for e in errors)
    assert all(e is None or isinstance(e, EngineClosed) for e in errors)


# -- chunked prefill -----------------------------------------------------------------------------

def test_long_prompt_prefills_in_chunks_while_a_stream_keeps_decoding(long_ckpts, long_ref, tokenizer):
    long_prompt = tokenizer.encode(" ".join(PROMPTS))[:44]
    with Engine(load(long_ckpts, "mlp"), max_batch=2, prefill_chunk=4) as engine:
        running = engine.submit(PROMPTS[1], max_new_tokens=150)
        wait_until(lambda: engine.stats["tokens"] >= 1)
        first = len(engine.trace)
        late = engine.submit(long_prompt, max_new_tokens=6)
        outs = running.result(WAIT), late.result(WAIT)
        steps = list(engine.trace)[first:]
    late_id = outs[1].request_id
    chunks = [(i, c) for i, s in enumerate(steps) for c in s["prefill"] if c[0] == late_id]
    assert len(chunks) == 11  # 44 tokens, 4 per step
    assert all(end - start <= 4 for _, (_, start, end) in chunks)
    # every step that read a chunk of the long prompt also gave the running request a token
    assert all(outs[0].request_id in steps[i]["decode"] for i, _ in chunks)
    assert_equals_alone(outs[0], long_ref, PROMPTS[1], max_new_tokens=150)
    assert_equals_alone(outs[1], long_ref, long_prompt, max_new_tokens=6)


@pytest.mark.parametrize("fails", [False, True])
def test_prompt_chunks_and_decode_rows_share_one_forward_or_run_apart_when_it_fails(long_ckpts, long_ref, tokenizer,
                                                                                   monkeypatch, caplog, fails):
    calls = []
    together = ModelStep.prefill_decode

    def spy(self, *args):
        calls.append(args)
        if fails:
            raise RuntimeError("boom")
        return together(self, *args)

    monkeypatch.setattr(ModelStep, "prefill_decode", spy)
    sampled = {"temperature": 0.9, "top_p": 0.9}
    kws = [{"max_new_tokens": 40, "seed": 3, **sampled}, {"max_new_tokens": 6}, {"max_new_tokens": 5, "seed": 5,
                                                                                 **sampled}]
    prompts = [PROMPTS[1], tokenizer.encode(" ".join(PROMPTS))[:22], PROMPTS[2]]
    with (caplog.at_level(logging.WARNING, logger=engine_module.__name__),
          Engine(load(long_ckpts, "mlp"), max_batch=3, prefill_chunk=4) as engine):
        running = engine.submit(prompts[0], **kws[0])  # seeded: draws from its own generator in every step
        wait_until(lambda: engine.stats["tokens"] >= 1)
        late = [engine.submit(p, **kw) for p, kw in zip(prompts[1:], kws[1:])]
        outs = [running.result(WAIT), *(f.result(WAIT) for f in late)]
        steps = list(engine.trace)
    # steps that read prompt chunks while others decode (a prompt completing alone decodes in its own step, apart)
    both = [s for s in steps if s["prefill"] and set(s["decode"]) - {rid for rid, _, _ in s["prefill"]}]
    assert len(calls) == len(both) >= 6  # every step with both, in one forward (22 + 3 prompt tokens, 4 a step)
    assert ("running them apart" in caplog.text) == fails
    for out, p, kw in zip(outs, prompts, kws):
        assert_equals_alone(out, long_ref, p, **kw)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_prefill_steps_must_be_a_positive_number(ckpts, bad):
    with pytest.raises(ValueError, match="prefill_steps"):
        Engine(load(ckpts, "mlp"), prefill_steps=bad)


def test_prefill_budget_comes_from_measured_steps_and_bounds_each_steps_prefill(long_ckpts, long_ref, tokenizer):
    prompts = [tokenizer.encode(" ".join(PROMPTS[i:] + PROMPTS[:i]))[:30 + 3 * i] for i in range(4)]
    with Engine(load(long_ckpts, "mlp"), max_batch=2, prefill_chunk=64, prefill_steps=1.0) as engine:
        running = engine.submit(PROMPTS[1], max_new_tokens=100)
        wait_until(lambda: engine.stats["tokens"] >= 1)
        first = len(engine.trace)
        late = [engine.submit(p, max_new_tokens=4) for p in prompts]
        outs = running.result(WAIT), *(f.result(WAIT) for f in late)
        steps = list(engine.trace)[first:]
        budget = engine._sched.budget
    assert budget.token_seconds > 0 and budget.step_seconds > 0  # the engine fed both costs
    for s in steps:
        assert 16 <= s["budget"] <= 64 and sum(end - start for _, start, end in s["prefill"]) <= s["budget"]
        if not s["decode"]:
            assert s["budget"] == 64  # nothing to stall: the whole prefill_chunk
    assert_equals_alone(outs[0], long_ref, PROMPTS[1], max_new_tokens=100)
    for out, p in zip(outs[1:], prompts):
        assert_equals_alone(out, long_ref, p, max_new_tokens=4)


# -- argument errors -----------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "kwargs"), [
    ("", {}),
    ([], {}),
    ("hello", {"temperature": -1.0}),
    ("hello", {"top_p": 0.0}),
    ("hello", {"max_new_tokens": 0}),
    ("hello", {"seed": -1}),
    ("hello", {"stop": [""]}),
    ("hello", {"lmbda": 2.0}),
    ("hello " * 40, {"max_new_tokens": 30}),
])
def test_bad_requests_raise_value_error_at_the_call_like_joint_generator(engines, refs, prompt, kwargs):
    engine = engines["decoder"]
    with pytest.raises(ValueError) as want:
        refs["decoder"].generate(prompt, **kwargs)
    with pytest.raises(InvalidArgument) as got:
        engine.submit(prompt, **kwargs)
    # the same words, and the argument named structurally (a single prompt is "prompt", not "prompts[0]")
    assert str(want.value).endswith(got.value.detail)
    too_long = str(want.value).startswith("prompt too long")
    assert got.value.param == ("prompt" if not kwargs or too_long else next(iter(kwargs)))
    with pytest.raises(ValueError):
        engine.stream(prompt, **kwargs)
    with pytest.raises(ValueError):
        asyncio.run(engine.generate(prompt, **kwargs))
    assert engine.num_waiting == 0


def test_unknown_arguments_and_batches_are_refused(engines):
    with pytest.raises(TypeError, match="temprature"):
        engines["decoder"].submit("hello", temprature=0.5)
    with pytest.raises(ValueError, match="one prompt"):
        engines["decoder"].submit(["a", "b"])


def test_transformers_models_are_refused_by_name(ckpts):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, reference=True)
    with pytest.raises(ValueError, match="'gpt2' model running in transformers"):
        Engine(gen)


def test_from_pretrained_reads_mixing_and_serves(ckpts, tmp_path):
    engine = Engine.from_pretrained(ckpts["base"], ckpts["decoder"], max_batch=2, max_queue=4, cuda_graphs=True)
    with engine:
        assert (engine.max_batch, engine.max_queue, engine.max_context) == (2, 4, 64)
        assert (engine.pair.lmbda, engine.pair.knn_temp) == (0.55, 1.0)  # upstream's: no memdec_config.json
        assert isinstance(engine.submit("hi", max_new_tokens=2), concurrent.futures.Future)


# -- CUDA graphs ---------------------------------------------------------------------------------

def test_cpu_decodes_the_captured_step_eagerly_after_one_log_line(ckpts, caplog):
    with caplog.at_level(logging.INFO, logger="memdec_fast.engine.step"):
        engine = Engine(load(ckpts, "mlp"), max_batch=2, cuda_graphs=True)
    assert not engine._step.replay
    assert [r.message for r in caplog.records if "CUDA graphs off" in r.message]
    with engine:
        assert len(engine.submit(PROMPTS[0], max_new_tokens=3).result(WAIT).token_ids) == 3
    assert not engine._step.graphs


@pytest.mark.skipif(not torch.cuda.is_available() or not ops.compiled_available(),
                    reason="needs CUDA and the compiled extension")
@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_graph_replays_give_the_eager_engines_tokens(ckpts, memory):
    kws = [{"max_new_tokens": 12}, {"max_new_tokens": 5, "temperature": 0.9, "seed": 3}, {"max_new_tokens": 9},
           {"max_new_tokens": 7, "temperature": 1.1, "top_p": 0.9, "seed": 4}, {"max_new_tokens": 10}]
    outs = {}
    for graphs in (False, True):
        gen = JointGenerator.from_pretrained(ckpts["base"], ckpts[memory], lmbda=0.4, knn_temp=0.8, device="cuda",
                                             dtype=torch.float32, cuda_graphs=False)
        with Engine(gen, max_batch=4, prefill_chunk=4, cuda_graphs=graphs) as engine:
            futs = [engine.submit(p, **kw) for p, kw in zip(PROMPTS, kws)]
            outs[graphs] = [f.result(WAIT).token_ids for f in futs]
            assert engine._step.replay == graphs
            assert bool(engine._step.graphs) == graphs
    assert outs[True] == outs[False]


def fake_captured_engine(gen: JointGenerator, fake: FakeCuda, **kw) -> Engine:
    """An engine whose decode steps are captured and replayed by `fake` (ModelStep's capture path on the CPU)."""
    fake.capture_calls_of(ModelStep, "_decode_body",
                          lambda step, rows, length: (torch.empty(rows, step.pair.vocab), torch.empty(rows, step.pair.vocab)))
    engine = Engine(gen, cuda_graphs=False, **kw)
    step = engine._step
    step.replay, step.stream, step.mempool = True, torch.cuda.Stream(), torch.cuda.graph_pool_handle()
    return engine


FAKE_KWS = [{"max_new_tokens": 9}, {"max_new_tokens": 6, "temperature": 1.25},
            {"max_new_tokens": 8, "temperature": 0.75, "top_p": 0.75}, {"max_new_tokens": 5, "temperature": 1.5, "seed": 3}]


def run_together(engine: Engine, kws: list[dict]) -> list[RequestOutput]:
    """PROMPTS with `kws`, admitted in one step, unseeded rows drawing from a step generator seeded the same."""
    engine._step.rng.manual_seed(11)
    with engine:
        with engine._sched.cond:
            futs = [engine.submit(p, **kw) for p, kw in zip(PROMPTS, kws)]
        return [f.result(WAIT) for f in futs]


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_fake_captured_decode_steps_give_the_eager_engines_tokens(ckpts, memory, monkeypatch):
    # the eager steps run the replays' rows: [0, n) with n the batch bucket (not the decoding rows alone, nor the
    # exact rows), so that the same rows draw the same numbers from the step's generator (the reference sampler
    # draws row by row); the four requests prefill together, before any decodes
    monkeypatch.setattr(engine_module, "GATHER_BELOW", 0.0)
    monkeypatch.setattr(ModelStep, "bucket", lambda step, rows: batch_bucket(rows, step.max_batch))
    want = run_together(Engine(load(ckpts, memory), max_batch=4, prefill_chunk=64, cuda_graphs=False), FAKE_KWS)
    fake = FakeCuda(monkeypatch)
    engine = fake_captured_engine(load(ckpts, memory), fake, max_batch=4, prefill_chunk=64)
    got = run_together(engine, FAKE_KWS)
    for g, w in zip(got, want):
        assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason)
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
    step = engine._step
    assert step.replay and fake.captures == len(step.graphs) >= 1
    assert sum(g.replays for g in fake.graphs) == engine.stats["decode_steps"]  # every step a replay
    assert all(len(g.generators) == 1 and g.generators[0] is step.rng for g in fake.graphs)
    assert fake.current is fake.default


def test_a_failed_fake_capture_makes_the_engine_decode_eagerly(ckpts, monkeypatch, caplog):
    want = run_together(Engine(load(ckpts, "decoder"), max_batch=4, prefill_chunk=64, cuda_graphs=False), FAKE_KWS)
    fake = FakeCuda(monkeypatch, fail_captures=[1])
    engine = fake_captured_engine(load(ckpts, "decoder"), fake, max_batch=4, prefill_chunk=64)
    with caplog.at_level(logging.WARNING, logger="memdec_fast.engine.step"):
        got = run_together(engine, FAKE_KWS)
    assert [(g.token_ids, g.finish_reason) for g in got] == [(w.token_ids, w.finish_reason) for w in want]
    assert [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert not engine._step.replay and not engine._step.graphs and fake.captures == 1
    assert ("set_stream", "default") in fake.log and fake.current is fake.default


# -- the slot cache under the engine -------------------------------------------------------------

def test_slot_forward_rows_at_their_own_positions_equal_full_forwards(ckpts):
    from memdec_fast.models import GPT2, GPT2Runner

    runner = GPT2Runner(GPT2.from_pretrained(ckpts["base"]))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 300, (9,), generator=g), torch.randint(0, 300, (4,), generator=g)
    caches = runner.new_slot_caches(3, 16 + 1)  # slot 16: scratch
    # a's first 6 tokens into row 2 and b's first 3 into row 0, one right-padded forward (rows gathered by index)
    ids = torch.stack([a[:6], torch.cat([b[:3], torch.zeros(3, dtype=torch.int64)])])  # [2, 6]
    pos = torch.stack([torch.arange(6), torch.tensor([0, 1, 2, 0, 0, 0])])
    slots = torch.stack([torch.arange(6), torch.tensor([0, 1, 2, 16, 16, 16])])
    logits, _ = runner.slot_forward(ids, pos, caches, torch.tensor([2, 0]), 6, slots, torch.tensor([5, 2]))
    torch.testing.assert_close(logits[0], runner.forward(a[None, :6])[0][0, -1])
    torch.testing.assert_close(logits[1], runner.forward(b[None, :3])[0][0, -1])
    # then one token per row over the slice of rows 0..2; row 1 is free and feeds a dummy token at position 0
    tok = torch.tensor([[b[3]], [0], [a[6]]])
    logits, _ = runner.slot_forward(tok, torch.tensor([[3], [0], [6]]), caches, slice(0, 3), 8)
    torch.testing.assert_close(logits[0], runner.forward(b[None, :4])[0][0, -1])
    torch.testing.assert_close(logits[2], runner.forward(a[None, :7])[0][0, -1])
