"""The lean Llama family (Llama, Qwen2, Mistral) against transformers, in float32, on tiny random checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import PAD_ROWS, save_mlp_memory
from test_decode_step import PROMPTS, flat
from test_models import slot_steps
from tiny_models import save_llama

from memdec_fast import JointGenerator, ops
from memdec_fast.engine import Engine
from memdec_fast.models import HFRunner, LlamaRunner, load_causal_lm, runners
from memdec_fast.models.llama import unsupported

CPU = torch.device("cpu")
compiled = pytest.mark.skipif(not ops.compiled_available(), reason="needs the compiled extension")
cuda = pytest.mark.skipif(not torch.cuda.is_available() or not ops.compiled_available(),
                          reason="needs CUDA and the compiled extension")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


@pytest.fixture(scope="module")
def lckpts(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("llama")
    return {
        # Llama 3 rope scaling, biases everywhere, untied, sharded weights (an index.json)
        "llama": save_llama(root / "llama", tokenizer, 0, "llama", shard="40KB", rope_scaling=LLAMA3_ROPE,
                            attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
        # q/k/v biases, tied embeddings, Qwen's rope theta
        "qwen2": save_llama(root / "qwen2", tokenizer, 1, "qwen2", tie_word_embeddings=True, rope_theta=1e6),
        # a Memory Decoder of another shape: 3 layers, 6 heads of 8 over 3 KV heads
        "qwen2_mem": save_llama(root / "qwen2_mem", tokenizer, 2, "qwen2", hidden_size=48, num_attention_heads=6,
                                num_key_value_heads=3, num_hidden_layers=3, tie_word_embeddings=True),
        # head_dim given apart from hidden_size (4 x 16 != 32); its window covers the whole context
        "mistral": save_llama(root / "mistral", tokenizer, 3, "mistral", head_dim=16, sliding_window=64),
        "mistral_window": save_llama(root / "mistral_window", tokenizer, 4, "mistral", sliding_window=8),
        "mlp": save_mlp_memory(root / "mlp", len(tokenizer) + PAD_ROWS, seed=5, n_embd=48, input_dim=32,
                               layer_position=0),
    }


def left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.encode(p) for p in prompts]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


# -- logits against transformers ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_logits_and_mlp_input_equal_transformers_prefill_and_20_decode_steps(lckpts, tokenizer, kind):
    lean, hf = (load_causal_lm(lckpts[kind], CPU, torch.float32, lean=flag) for flag in (True, False))
    assert isinstance(lean, LlamaRunner) and isinstance(hf, HFRunner)
    assert (lckpts[kind] / "model.safetensors.index.json").is_file() == (kind == "llama")  # sharded: read all shards
    lean.hidden_layer = hf.hidden_layer = 0
    ids, mask = left_padded(tokenizer, PROMPTS)  # three prompts of different lengths: left padding for transformers
    b = [hf.prefill(ids, mask, ids.shape[1] + 21)]
    for _ in range(20):
        b.append(hf.decode(b[-1][0][:, : len(tokenizer)].argmax(-1)))
    new = torch.stack([out[0][:, : len(tokenizer)].argmax(-1) for out in b[:-1]])  # [20, B] the tokens fed
    a = slot_steps(lean, [tokenizer.encode(p) for p in PROMPTS], new)  # the lean runner: each row in its own slot
    for step in range(21):
        torch.testing.assert_close(a[step][0], b[step][0], atol=1e-4, rtol=0, msg=f"{kind} logits, step {step}")
        torch.testing.assert_close(a[step][1], b[step][1], atol=1e-4, rtol=0, msg=f"{kind} MLP input, step {step}")
    # a window scored without a cache (perplexity), last positions only
    torch.testing.assert_close(lean.forward(ids[:1, -5:], last=3)[0], hf.forward(ids[:1, -5:], last=3)[0],
                               atol=1e-4, rtol=0)


def test_slot_forward_equals_each_row_alone(lckpts, tokenizer):
    """The engine's interface: rows of any lengths in caller-owned caches, each at its own positions."""
    lean = load_causal_lm(lckpts["llama"], CPU, torch.float32)
    want = [lean.forward(torch.tensor([tokenizer.encode(p)]))[0][0, -1] for p in PROMPTS]
    caches = lean.new_slot_caches(4, 32)
    assert caches[0][0].shape == (4, 2, 32, 8)  # [slots, Hkv, S, Dh]
    for i, p in enumerate(PROMPTS):
        row = tokenizer.encode(p)
        got = lean.slot_forward(torch.tensor([row]), torch.arange(len(row))[None], caches, torch.tensor([i + 1]),
                                len(row))[0]
        torch.testing.assert_close(got[0], want[i], atol=1e-4, rtol=0)


# -- JointGenerator: lean against the reference path ----------------------------------------------

@pytest.mark.parametrize(("base", "memory"), [("qwen2", "qwen2_mem"), ("llama", "mlp")])
def test_greedy_joint_generator_equals_the_reference_path(lckpts, base, memory):
    lean = JointGenerator.from_pretrained(lckpts[base], lckpts[memory], lmbda=0.4, knn_temp=0.8)
    ref = JointGenerator.from_pretrained(lckpts[base], lckpts[memory], lmbda=0.4, knn_temp=0.8, reference=True)
    assert isinstance(lean.base, LlamaRunner) and isinstance(ref.base, HFRunner)
    assert isinstance(lean.memory, LlamaRunner) == (memory == "qwen2_mem")
    got, want = lean.generate(PROMPTS, max_new_tokens=12), ref.generate(PROMPTS, max_new_tokens=12)
    assert got.token_ids == want.token_ids
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)
    # perplexity's scoring path
    ids = torch.tensor([lean.tokenizer.encode(PROMPTS[2])])
    for x, y in zip(lean.score_logits(ids), ref.score_logits(ids)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


@cuda
@pytest.mark.parametrize(("base", "memory"), [("qwen2", "qwen2_mem"), ("llama", "mlp")])
def test_graph_replay_equals_eager_on_cuda(lckpts, base, memory):
    eager, graphed = (JointGenerator.from_pretrained(lckpts[base], lckpts[memory], lmbda=0.4, knn_temp=0.8,
                                                     device="cuda", dtype=torch.float32, cuda_graphs=g)
                      for g in (False, True))
    for kw in ({}, {"temperature": 0.9, "top_p": 0.95, "seed": 5}):
        want, got = eager.generate(PROMPTS, max_new_tokens=12, **kw), graphed.generate(PROMPTS, max_new_tokens=12, **kw)
        assert got.token_ids == want.token_ids, kw
        assert torch.allclose(flat(got.logprobs), flat(want.logprobs), atol=1e-4), kw
    assert graphed._step.graphs  # the steps did replay a graph


def test_engine_serves_a_lean_qwen2_pair(lckpts):
    gen = JointGenerator.from_pretrained(lckpts["qwen2"], lckpts["qwen2_mem"], lmbda=0.4, cuda_graphs=False)
    want = [gen.generate(p, max_new_tokens=8).token_ids[0] for p in PROMPTS]
    with Engine(gen, max_batch=2, prefill_chunk=4, max_context=40) as engine:
        assert engine.max_context == 40 and engine._step.caches[0][0][0].shape == (2, 2, 41, 8)  # [slots, Hkv, S+1, Dh]
        futures = [engine.submit(p, max_new_tokens=8) for p in PROMPTS]
        assert [f.result(timeout=60).token_ids for f in futures] == want
    with pytest.raises(ValueError, match="max_context"):
        Engine(gen, max_context=1)


# -- what the lean runner refuses -----------------------------------------------------------------

def test_a_window_shorter_than_the_context_falls_back_with_one_log_line(lckpts, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger=runners.__name__):
        runner = load_causal_lm(lckpts["mistral_window"], CPU, torch.float32)
    assert isinstance(runner, HFRunner)
    records = [r for r in caplog.records if r.name == runners.__name__]
    assert len(records) == 1 and "sliding_window=8" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=runners.__name__):
        assert isinstance(load_causal_lm(lckpts["mistral"], CPU, torch.float32), LlamaRunner)
    assert not caplog.records


def test_unsupported_options_are_named():
    base = {"model_type": "qwen2", "num_hidden_layers": 24, "max_position_embeddings": 32768}
    assert unsupported(base) is None
    assert unsupported(base | {"use_sliding_window": False, "sliding_window": 4096}) is None  # Qwen2.5's config
    assert unsupported(base | {"use_sliding_window": True, "sliding_window": 32768}) is None  # never binds
    assert "sliding_window=4096" in unsupported(base | {"use_sliding_window": True, "sliding_window": 4096,
                                                        "max_window_layers": 21})
    assert "sliding_window" in unsupported({"model_type": "mistral", "sliding_window": 4096,
                                            "max_position_embeddings": 32768})
    assert unsupported({"model_type": "mistral", "sliding_window": None}) is None
    assert "mixture of experts (num_experts=60)" in unsupported(base | {"num_experts": 60})
    assert "num_local_experts" in unsupported({"model_type": "mistral", "num_local_experts": 8})
    assert "'yarn'" in unsupported(base | {"rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert "'dynamic'" in unsupported({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic"}})
    assert unsupported({"model_type": "llama", "rope_scaling": LLAMA3_ROPE}) is None
    assert "partial_rotary_factor=0.5" in unsupported({"model_type": "llama", "partial_rotary_factor": 0.5})
    assert "quantization_config" in unsupported(base | {"quantization_config": {"quant_method": "gptq"}})
    assert "hidden_act 'gelu'" in unsupported(base | {"hidden_act": "gelu"})
    assert "model_type" in unsupported({"model_type": "gemma"})
