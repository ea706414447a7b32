"""Several memories over one base in one Engine: each request equals JointGenerator with its memory alone.

Tiny random checkpoints (CPU, float32): two Memory Decoders and an MLP Memory over one base. Every wait is
bounded (WAIT seconds).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import PAD_ROWS, save_gpt2

from memdec_fast import JointGenerator
from memdec_fast.engine import Engine, InvalidArgument, RequestOutput
from memdec_fast.models.pair import ModelPair

WAIT = 60.0
PROMPTS = ["the quick brown fox", "a plug", "memory decoders give a base", "héllo", "the lazy dog jumps over the fox",
           "domain knowledge"]
MIXING = {"bio": (0.4, 0.8), "law": (0.7, 1.3), "fin": (0.3, 1.0)}  # lmbda, knn_temp per memory


@pytest.fixture(scope="module")
def paths(ckpts, tmp_path_factory, tokenizer):
    """The memories by name: two Memory Decoders of one shape (they share slot caches), an MLP Memory, and
    ("odd") a Memory Decoder of another shape."""
    law = save_gpt2(tmp_path_factory.mktemp("law") / "decoder", tokenizer, seed=11, n_embd=48, n_head=3, n_layer=3,
                    activation_function="relu")
    odd = save_gpt2(tmp_path_factory.mktemp("odd") / "decoder", tokenizer, seed=12, n_embd=16, n_head=2, n_layer=2)
    return {"bio": ckpts["decoder"], "law": law, "fin": ckpts["mlp"], "odd": odd}


def specs(paths) -> dict:
    return {name: {"path": paths[name], "lmbda": MIXING[name][0], "knn_temp": MIXING[name][1]} for name in MIXING}


@pytest.fixture(scope="module")
def engine(ckpts, paths):
    with Engine.from_pretrained(ckpts["base"], memories=specs(paths), cuda_graphs=False, max_batch=12,
                                prefill_chunk=16) as eng:
        yield eng


@pytest.fixture(scope="module")
def refs(ckpts, paths):
    """JointGenerator with each memory alone; None: the base alone (lmbda 0 over any memory)."""
    out = {name: JointGenerator.from_pretrained(ckpts["base"], paths[name], lmbda=lm, knn_temp=kt, cuda_graphs=False)
           for name, (lm, kt) in MIXING.items()}
    out[None] = out["bio"]
    return out


def alone(refs, memory, prompt, **kw):
    if memory is None:
        kw = kw | {"lmbda": 0.0}
    return refs[memory].generate(prompt, **kw)


def assert_equals_alone(out: RequestOutput, refs, memory, prompt, **kw) -> None:
    ref = alone(refs, memory, prompt, **kw)
    assert out.token_ids == ref.token_ids[0], memory
    assert out.text == ref.texts[0]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(ref.logprobs[0]), atol=1e-4, rtol=0)
    assert out.finish_reason == ref.finish_reasons[0]


def test_engine_memories_are_shared_base_pairs(engine):
    pairs = list(engine.memories.values())
    assert list(engine.memories) == ["bio", "law", "fin"]
    assert all(p.base is pairs[0].base for p in pairs)
    assert [(p.lmbda, p.knn_temp) for p in pairs] == list(MIXING.values())
    assert [p.is_mlp for p in pairs] == [False, False, True]
    # the base's caches, and one set for both Memory Decoders (one shape); the MLP Memory keeps none
    assert len(engine._step.caches) == 2
    assert engine._step.memory_caches[0] is engine._step.memory_caches[1] is engine._step.caches[1]


def test_24_concurrent_requests_over_three_memories_and_the_base_equal_each_alone(engine, refs):
    memories = ["bio", "law", "fin", None]
    cases = [(memories[i % 4], PROMPTS[i % len(PROMPTS)], 4 + i % 7) for i in range(24)]
    with engine._sched.cond:  # all 24 queue before the loop admits any: the batches mix every memory
        futs = [engine.submit(p, memory=m, max_new_tokens=n) for m, p, n in cases]
    first = len(engine.trace)
    outs = [f.result(WAIT) for f in futs]
    for (memory, prompt, n), out in zip(cases, outs):
        assert_equals_alone(out, refs, memory, prompt, max_new_tokens=n)
    by_id = {o.request_id: m for (m, _, _), o in zip(cases, outs)}
    batches = [s["decode"] for s in list(engine.trace)[first:] if s["decode"]]
    assert max(len({by_id[r] for r in b if r in by_id}) for b in batches) == 4  # one step ran all four kinds


def test_seeded_sampling_repeats_and_equals_each_alone(engine, refs):
    kw = {"max_new_tokens": 8, "temperature": 1.2, "top_k": 50, "top_p": 0.95}
    cases = list(itertools.product(["bio", "law", "fin", None], [3, 4]))
    futs = [engine.submit(PROMPTS[seed], memory=m, seed=seed, **kw) for m, seed in cases]
    futs += [engine.submit(PROMPTS[0], memory="law", **kw)]  # unseeded: shares the batched sampler call
    outs = [f.result(WAIT) for f in futs]
    for (memory, seed), out in zip(cases, outs):
        assert_equals_alone(out, refs, memory, PROMPTS[seed], seed=seed, **kw)
    again = [engine.submit(PROMPTS[seed], memory=m, seed=seed, **kw) for m, seed in cases]
    assert [f.result(WAIT).token_ids for f in again] == [o.token_ids for o in outs[: len(cases)]]


def test_request_memory_and_lmbda_checks(engine):
    with pytest.raises(InvalidArgument, match=r"unknown memory 'tax'.*'bio', 'law', 'fin'") as err:
        engine.submit("hi", memory="tax")
    assert err.value.param == "memory"
    with pytest.raises(InvalidArgument, match="the base alone"):
        engine.submit("hi", memory=None, lmbda=0.5)
    # a request's own lmbda overrides its memory's
    assert engine.submit("hi", memory="bio", lmbda=0.9, max_new_tokens=2).result(WAIT).finish_reason is not None


def test_one_pair_engine_takes_memory_none_as_the_base_alone(ckpts, refs, paths):
    pair = ModelPair.from_pretrained(ckpts["base"], paths["bio"], lmbda=0.4, knn_temp=0.8)
    with Engine(pair, max_batch=2, cuda_graphs=False) as eng:
        base, mixed = (eng.submit(PROMPTS[2], memory=m, max_new_tokens=6) for m in (None, "<default>"))
        assert_equals_alone(base.result(WAIT), refs, None, PROMPTS[2], max_new_tokens=6)
        assert_equals_alone(mixed.result(WAIT), refs, "bio", PROMPTS[2], max_new_tokens=6)
        with pytest.raises(InvalidArgument, match="unknown memory 'bio'"):
            eng.submit("hi", memory="bio")


# -- start-up checks: one line naming the memory -------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer):
    """A Memory Decoder of another vocabulary (more output rows than the base), with the same tokenizer files."""
    return save_gpt2(tmp_path_factory.mktemp("wide") / "decoder", tokenizer, seed=4,
                     vocab_size=len(tokenizer) + PAD_ROWS + 8)


@pytest.mark.parametrize(("memories", "message"), [
    ({"bio": "decoder", "a/b": "decoder"}, r"^memory 'a/b': a memory name takes"),
    ({"bio": "decoder", "": "decoder"}, r"^memory '': a memory name takes"),
    ({"bio": "decoder", "wide": "wide"}, r"^memory 'wide': vocabulary mismatch"),
    ({"fin": "mlp", "last": "mlp_last"}, r"^memory 'last': its MLP Memory reads base block -1"),
    ({"bio": "decoder", "gone": "missing"}, r"^memory 'gone': .*missing: no such directory"),
])
def test_start_up_checks_give_one_line_naming_the_memory(ckpts, wide, tmp_path, memories, message):
    where = ckpts | {"wide": wide, "missing": tmp_path / "missing"}
    with pytest.raises((ValueError, OSError), match=message) as err:  # a missing directory: FileNotFoundError
        Engine.from_pretrained(ckpts["base"], memories={n: where[k] for n, k in memories.items()}, cuda_graphs=False,
                               max_batch=1)
    assert "\n" not in str(err.value)


def test_duplicate_names_give_one_line_naming_the_memory():
    from memdec_fast.models import checks

    with pytest.raises(ValueError, match=r"^memory 'bio': the name is given twice") as err:
        checks.check_memory_names(["bio", "law", "bio"])
    assert "\n" not in str(err.value)


def test_memory_and_memories_are_exclusive(ckpts):
    with pytest.raises(ValueError, match="pass one memory, or memories"):
        Engine.from_pretrained(ckpts["base"], ckpts["decoder"], memories={"bio": ckpts["decoder"]})
    with pytest.raises(ValueError, match="pass one memory, or memories"):
        Engine.from_pretrained(ckpts["base"])


def test_several_memories_decode_without_cuda_graphs(engine):
    from memdec_fast.engine.step import graph_reason

    assert "3 memories share the base" in graph_reason(engine.pair, 3)
    assert not engine._step.replay and not engine._step.graphs


def test_decoders_of_another_shape_get_caches_of_their_own(ckpts, paths, refs):
    odd = JointGenerator.from_pretrained(ckpts["base"], paths["odd"], lmbda=0.5, knn_temp=1.0, cuda_graphs=False)
    memories = {"bio": specs(paths)["bio"], "odd": {"path": paths["odd"], "lmbda": 0.5, "knn_temp": 1.0}}
    with Engine.from_pretrained(ckpts["base"], memories=memories, cuda_graphs=False, max_batch=4) as eng:
        assert len(eng._step.caches) == 3  # the base, and one set per decoder shape
        cases = [(m, p) for m in ("odd", "bio") for p in PROMPTS[:3]]
        futs = [eng.submit(p, memory=m, max_new_tokens=6) for m, p in cases]
        for (memory, prompt), fut in zip(cases, futs):
            assert_equals_alone(fut.result(WAIT), refs | {"odd": odd}, memory, prompt, max_new_tokens=6)


def test_a_slot_passed_between_memories_of_shared_caches_carries_nothing(ckpts, paths, refs):
    """Two decoders of one shape share slot caches: a memory whose position embeddings are NaN from position 20 on
    (its request at lmbda 0 runs past that, writing NaN into the shared caches) must leave nothing for the next
    request in that slot, of the other memory."""
    with Engine.from_pretrained(ckpts["base"], memories={n: specs(paths)[n] for n in ("law", "bio")},
                                cuda_graphs=False, max_batch=1) as eng:
        with torch.no_grad():
            eng.memories["law"].memory.model.wpe.weight[20:] = float("nan")
        eng.submit(PROMPTS[4], memory="law", max_new_tokens=40, lmbda=0.0).result(WAIT)  # writes NaN at 20+
        out = eng.submit(PROMPTS[0], memory="bio", max_new_tokens=30).result(WAIT)
    assert_equals_alone(out, refs, "bio", PROMPTS[0], max_new_tokens=30)
