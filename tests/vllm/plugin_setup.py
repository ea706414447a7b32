"""The tiny pairs the vLLM plugin's tests serve, and the engine arguments they use.

GPT-2 and Llama bases and memories with head_dim 32 or 64 (vLLM's CPU attention refuses the demo pair's 24), saved
with the byte-level tokenizer of tests/tiny_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import PAD_ROWS, save_gpt2, save_llama, save_mlp_memory

LMBDA = 0.4
MAX_LEN = 128
# what each engine serves: (base, memory) names of save_pairs' checkpoints
SERVED = {"decoder": ("base", "decoder"), "mlp": ("base", "mlp"),
          "llama-decoder": ("llama", "llama_decoder"), "llama-mlp": ("llama", "llama_mlp")}


def save_pairs(root: Path, tokenizer) -> dict[str, Path]:
    """Bases and their memories (see SERVED): Memory Decoders of other shapes, MLP Memories reading block 0 of 2."""
    vocab = len(tokenizer) + PAD_ROWS
    llama = {"max_position_embeddings": MAX_LEN, "hidden_size": 64, "intermediate_size": 96}
    paths = {
        "base": save_gpt2(root / "base", tokenizer, seed=0, n_embd=64, n_head=2, n_positions=MAX_LEN),
        "decoder": save_gpt2(root / "decoder", tokenizer, seed=1, n_embd=64, n_head=1, n_layer=3,
                             n_positions=MAX_LEN, activation_function="relu"),
        "mlp": save_mlp_memory(root / "mlp", vocab, seed=2, n_embd=48, input_dim=64, layer_position=0),
        # 2 heads, as tensor parallelism over 2 ranks needs
        "decoder2": save_gpt2(root / "decoder2", tokenizer, seed=6, n_embd=64, n_head=2, n_positions=MAX_LEN),
        # biases everywhere, untied embeddings, 2 heads of 32 over 1 KV head
        "llama": save_llama(root / "llama", tokenizer, 3, "llama", num_attention_heads=2, num_key_value_heads=1,
                            attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **llama),
        "llama_decoder": save_llama(root / "llama_decoder", tokenizer, 4, "llama", num_hidden_layers=3,
                                    num_attention_heads=1, num_key_value_heads=1, **llama),
        # upstream's layout: the weights in knn_generator/, layer_position (0, not the default -1) in the folder above
        "llama_mlp": save_mlp_memory(root / "llama_mlp" / "knn_generator", vocab, seed=5, n_embd=64, input_dim=None,
                                     layer_position=None),
    }
    (root / "llama_mlp" / "mlp_memory_config.json").write_text(json.dumps({"layer_position": 0}))
    return paths


def overrides(memory, **extra) -> dict:
    """hf_overrides that serve the base with `memory`."""
    return {"architectures": ["MemDecForCausalLM"], "memdec_memory": str(memory), **extra}


def engine_args(base, memory, **extra) -> dict:
    """vllm.LLM arguments for a float32, eager CPU engine of the base and `memory` at lambda LMBDA."""
    args = {"model": str(base), "dtype": "float32", "enforce_eager": True, "max_model_len": MAX_LEN, "seed": 0,
            "hf_overrides": overrides(memory, memdec_lmbda=LMBDA)}
    if torch.cuda.is_available():  # on vLLM's CUDA build: room for the session's several engines on one GPU
        args["gpu_memory_utilization"] = 0.1
    return args | extra
