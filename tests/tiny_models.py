"""Tiny random checkpoints saved to disk, built offline in a few seconds (shared by tests/ and tests/vllm/).

All models share one byte-level BPE tokenizer; their vocabularies have 5 padded
rows beyond len(tokenizer), as real checkpoints often do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PAD_ROWS = 5
EOS = "<|endoftext|>"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "memory decoders give a base model domain knowledge",
    "a plug and play memory for large language models",
    "héllo wörld, ünïcode tëxt 数据 ✓",
] * 4


def build_tokenizer():
    """A byte-level BPE tokenizer (about 300 tokens) with an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def save_gpt2(path: Path, tokenizer, seed: int, save_tokenizer: bool = True, **config) -> Path:
    """A random GPT2LMHeadModel (weights drawn wide enough to avoid near-ties) saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = {"vocab_size": len(tokenizer) + PAD_ROWS, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
    cfg.update(config)
    model = GPT2LMHeadModel(GPT2Config(initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **cfg)).eval()
    model.save_pretrained(path)
    if save_tokenizer:
        tokenizer.save_pretrained(path)
    return path


def save_mlp_memory(
    path: Path, vocab_size: int, seed: int, n_embd: int, input_dim: int | None, layer_position: int | None
) -> Path:
    """A random MLP Memory in the upstream format: GPT2Config + Conv1D-layout weights."""
    from safetensors.torch import save_file
    from transformers import GPT2Config

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    n_layer, inner = 2, 4 * n_embd
    state = {"ln_f.weight": 1 + rand(n_embd), "ln_f.bias": rand(n_embd), "lm_head.weight": rand(vocab_size, n_embd)}
    if input_dim is not None:
        state |= {"embedding_transform.weight": rand(n_embd, input_dim), "embedding_transform.bias": rand(n_embd)}
    for i in range(n_layer):
        state |= {
            f"h.{i}.ln_1.weight": 1 + rand(n_embd), f"h.{i}.ln_1.bias": rand(n_embd),
            f"h.{i}.mlp.c_fc.weight": rand(n_embd, inner), f"h.{i}.mlp.c_fc.bias": rand(inner),
            f"h.{i}.mlp.c_proj.weight": rand(inner, n_embd), f"h.{i}.mlp.c_proj.bias": rand(n_embd),
        }
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, activation_function="gelu_new", bos_token_id=0, eos_token_id=0).to_json_file(
        path / "config.json"
    )
    if layer_position is not None:
        (path / "mlp_memory_config.json").write_text(json.dumps({"layer_position": layer_position}))
    return path


def save_llama(path: Path, tokenizer, seed: int, kind: str, shard: str | None = None, **config) -> Path:
    """A random LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM saved with save_pretrained, with the
    tokenizer; weights drawn wide enough to avoid near-ties."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    cfg = {"vocab_size": len(tokenizer) + PAD_ROWS, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
           "initializer_range": 0.2, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id}
    cfg.update(config)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**cfg)).eval()
    with torch.no_grad():  # RMSNorm weights start at one: move them, or their loading would go untested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(path)
    return path
