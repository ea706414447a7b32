"""The MLP Memory on vLLM's layers, and the tap that feeds it the base's hidden state.

Same upstream checkpoint format as :mod:`memdec_fast.models.mlp_memory`. Each
block's MLP is vLLM's GPT2MLP (a column-parallel c_fc, a row-parallel c_proj) and
the output head is vocabulary-parallel, so the memory shards under tensor
parallelism; the optional embedding_transform and the layer norms are replicated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.gpt2 import GPT2MLP

from memdec_fast.models import checkpoint
from memdec_fast.models.mlp_memory import CONV1D_WEIGHTS
from memdec_fast.models.runners import mlp_blocks


class MLPMemoryBlock(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config.n_inner or 4 * config.n_embd, config, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln_1(x))


class ParallelMLPMemory(nn.Module):
    """Next-token logits from the hidden state entering a base block's MLP.

    Parameters
    ----------
    config : the memory's GPT2Config (n_layer, n_embd, activation_function, vocab_size)
    input_dim : width of the base's hidden state when it differs from n_embd (an embedding_transform), else None
    """

    def __init__(self, config, input_dim: int | None, quant_config=None, prefix: str = ""):
        super().__init__()
        self.embedding_transform = None
        if input_dim is not None:
            self.embedding_transform = ReplicatedLinear(input_dim, config.n_embd, bias=True,
                                                        prefix=f"{prefix}.embedding_transform")
        self.h = nn.ModuleList(MLPMemoryBlock(config, quant_config, f"{prefix}.h.{i}") for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = ParallelLMHead(config.vocab_size, config.n_embd, quant_config=quant_config,
                                      prefix=f"{prefix}.lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, input_dim] -> logits [N, vocab_size]
        x = x.to(self.ln_f.weight.dtype)
        if self.embedding_transform is not None:
            x, _ = self.embedding_transform(x)
        for block in self.h:
            x = block(x)
        return self.logits_processor(self.lm_head, self.ln_f(x))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load upstream-format weights (Conv1D layout, optional ``transformer.`` prefix); the names loaded."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("transformer.")
            if name not in params:
                raise ValueError(f"MLP Memory: unexpected weight {name!r} (shape {list(tensor.shape)})")
            tensor = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor  # vLLM's linears hold [out, in]
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


def transform_width(memory: str | os.PathLike) -> int | None:
    """Input width of an MLP Memory's embedding_transform, or None when it has none (it reads n_embd)."""
    shapes = checkpoint.weight_shapes(checkpoint.weight_files(memory))
    shape = shapes.get("embedding_transform.weight") or shapes.get("transformer.embedding_transform.weight")
    return None if shape is None else shape[1]


def tap_mlp_input(base: nn.Module, layer: int, buffer: torch.Tensor) -> None:
    """Copy the input of base block `layer`'s MLP (the hidden state after its norm) into buffer[:tokens] at every
    forward. A hook leaves the base's weight names as they are, and copying into a fixed buffer keeps the tap
    valid under CUDA graphs."""

    def copy_input(module, args):
        x = args[0]  # [tokens, hidden]
        buffer[: x.shape[0]].copy_(x)

    mlp_blocks(base)[layer].mlp.register_forward_pre_hook(copy_input)
