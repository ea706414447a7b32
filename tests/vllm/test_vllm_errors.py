"""Each deployment the plugin cannot serve fails when vLLM builds its config, before any worker or weight, with one
sentence naming the problem."""

from __future__ import annotations

import pytest
from plugin_setup import engine_args, overrides
from tiny_models import build_tokenizer, save_gpt2, save_llama
from vllm import LLM
from vllm.engine.arg_utils import EngineArgs

from memdec_fast.vllm import MemDecConfigError


@pytest.fixture(scope="module")
def bad_memories(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("bad_memories")
    other = build_tokenizer()
    other.add_tokens(["<extra-token>"])
    return {
        "short_context": save_gpt2(root / "short_context", tokenizer, seed=7, n_embd=64, n_head=2, n_positions=16),
        # 6 heads over 3 KV heads: tensor_parallel_size 2 divides the heads, not the KV heads
        "three_kv_heads": save_llama(root / "three_kv_heads", tokenizer, 8, "llama", hidden_size=192,
                                     num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128),
        # no tokenizer files: only its output rows can tell, and they do not cover the base's tokenizer
        "few_rows": save_gpt2(root / "few_rows", tokenizer, seed=4, save_tokenizer=False,
                              vocab_size=len(tokenizer) - 10, n_embd=64, n_head=2),
        "other_tokenizer": save_gpt2(root / "other_tokenizer", other, seed=5, n_embd=64, n_head=2),
    }


def refused(match: str, **args) -> None:
    """LLM(**args) stops with our sentence alone: no pydantic validation report around it."""
    with pytest.raises(MemDecConfigError, match=match) as err:
        LLM(**args)
    assert "\n" not in str(err.value) and "validation error" not in str(err.value), err.value
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_missing_memory(pairs, tmp_path):
    refused(r"memdec_memory: .*no such directory", **engine_args(pairs["base"], tmp_path / "nowhere"))


def test_memory_on_an_unreachable_hub(pairs, monkeypatch):
    from memdec_fast.models import checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint._hub_reachable.cache_clear()  # its answer is cached: ask again under HF_HUB_OFFLINE, and after
    try:
        refused(r"memdec_memory: someone/no-such-memory: not a local directory, not in the Hugging Face cache, and "
                r"the hub cannot be reached", **engine_args(pairs["base"], "someone/no-such-memory"))
    finally:
        checkpoint._hub_reachable.cache_clear()


def test_memory_not_named(pairs):
    refused(r"name the memory in hf_overrides",
            **engine_args(pairs["base"], pairs["decoder"], hf_overrides={"architectures": ["MemDecForCausalLM"]}))


def test_vocabulary_mismatch(pairs, bad_memories):
    refused(r"vocabulary mismatch: the memory model has 290 output rows, but the tokenizer has 300 tokens",
            **engine_args(pairs["base"], bad_memories["few_rows"]))


def test_tokenizer_mismatch(pairs, bad_memories):
    refused(r"tokenizer mismatch", **engine_args(pairs["base"], bad_memories["other_tokenizer"]))


def test_tensor_parallel_size_must_divide_the_memory_heads(pairs):
    # the base has 2 heads, the Memory Decoder 1
    refused(r"tensor_parallel_size 2 does not divide the memory's 1 attention heads",
            **engine_args(pairs["base"], pairs["decoder"], tensor_parallel_size=2))


def test_tensor_parallel_size_must_fit_the_key_value_heads(pairs, bad_memories):
    refused(r"tensor_parallel_size 2 neither divides nor is a multiple of the memory's 3 key-value heads",
            **engine_args(pairs["base"], bad_memories["three_kv_heads"], tensor_parallel_size=2))


def test_a_memory_with_a_shorter_context_needs_max_model_len(pairs, bad_memories):
    refused(r"has 16 positions, fewer than max_model_len 128: pass --max-model-len 16",
            **engine_args(pairs["base"], bad_memories["short_context"]))
    EngineArgs(**engine_args(pairs["base"], bad_memories["short_context"], max_model_len=16)).create_engine_config()


def test_a_quantized_base_is_refused(pairs):
    refused(r"a quantized base \(fp8\) is not supported",
            **engine_args(pairs["base"], pairs["decoder"], quantization="fp8", dtype="bfloat16"))


def test_micro_batch_overlap_is_refused_with_an_mlp_memory(pairs):
    refused(r"dual batch overlap \(micro-batching\) is not supported with an MLP Memory",
            **engine_args(pairs["base"], pairs["mlp"], enable_dbo=True))


def test_pipeline_parallelism_is_refused(pairs):
    refused(r"pipeline parallelism is not supported",
            **engine_args(pairs["base"], pairs["decoder"], pipeline_parallel_size=2))


def test_speculative_decoding_is_refused(pairs):
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    refused(r"speculative decoding is not supported",
            **engine_args(pairs["base"], pairs["decoder"], speculative_config=spec))


def test_prompt_embeddings_are_refused_with_a_memory_decoder(pairs):
    refused(r"prompt embeddings are not supported with a Memory Decoder",
            **engine_args(pairs["base"], pairs["decoder"], enable_prompt_embeds=True))


@pytest.mark.parametrize(("extra", "match"), [
    ({"memdec_memory_type": "mlp"}, r"memdec_memory_type: 'mlp', but .* looks like a Memory Decoder"),
    ({"memdec_memory_type": "knn"}, r"memdec_memory_type: unknown memory type 'knn'"),
    ({"memdec_lmbda": 1.5}, r"memdec_lmbda: 1.5 is outside"),
    ({"memdec_knn_temp": "hot"}, r"memdec_knn_temp: expected a number"),
])
def test_bad_settings(pairs, extra, match):
    refused(match, **engine_args(pairs["base"], pairs["decoder"], hf_overrides=overrides(pairs["decoder"], **extra)))
