"""MemDecForCausalLM: vLLM serves a base causal LM and its memory as one model.

The base is vLLM's own model of its architecture. A Memory Decoder is a second
vLLM model on the same tokens, with its own KV cache (vLLM manages both). An MLP
Memory reads the base's hidden state entering block ``layer_position``'s MLP and
runs on the sampled rows only. ``forward`` returns both hidden states side by side;
``compute_logits`` turns the rows vLLM samples from into

    log p_mix + logsumexp(base_logits)

over the base's vocabulary (rows beyond the tokenizer are -inf), with p_mix from
:func:`memdec_fast.ops.joint_logprobs`. vLLM's sampler, logprobs and penalties then
act on the mixture: greedy is argmax p_mix, temperature / top-k / top-p / min-p are
Hugging Face's warpers on log p_mix, and reported logprobs are log p_mix. The shift
by logsumexp(base_logits) changes no distribution; it gives the repetition penalty
(which scales positive and negative scores differently) the base's logit scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

from memdec_fast import ops
from memdec_fast.models import checkpoint, checks
from memdec_fast.models.mlp_memory import read_layer_position
from memdec_fast.vllm import settings as deployment
from memdec_fast.vllm.mlp_memory import ParallelMLPMemory, tap_mlp_input, transform_width


class MemDecForCausalLM(nn.Module):
    """A base and its Memory Decoder or MLP Memory, mixed at every sampled row (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        s, mem_config = deployment.settings_of(vllm_config)
        self.settings = s
        text_config = vllm_config.model_config.hf_config.get_text_config()
        self.base = init_vllm_registered_model(vllm_config, prefix=maybe_prefix(prefix, "base"),
                                               architectures=[s.base_architecture])
        self.base_width = text_config.hidden_size
        self.is_mlp = s.memory_type == "mlp"
        if self.is_mlp:
            layers = text_config.num_hidden_layers
            layer = read_layer_position(s.memory)
            checks.check_layer_position(layer, layers)
            width = transform_width(s.memory)
            checks.check_hidden_size(width or mem_config.n_embd, self.base_width)
            self.memory = ParallelMLPMemory(mem_config, width, vllm_config.quant_config, maybe_prefix(prefix, "memory"))
            rows = vllm_config.scheduler_config.max_num_batched_tokens
            self.register_buffer("mlp_input", torch.empty(rows, self.base_width), persistent=False)  # [tokens, H]
            tap_mlp_input(self.base, layer % layers, self.mlp_input)
        else:
            with set_model_tag("memdec_memory"):  # its compiled pieces cached apart from the base's
                self.memory = init_vllm_registered_model(vllm_config, prefix=maybe_prefix(prefix, "memory"),
                                                         hf_config=mem_config)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None, **kwargs,
    ) -> torch.Tensor:
        """Both hidden states of the batch's tokens: [T, base hidden + memory hidden (or the base's MLP input)]."""
        hidden = self.base(input_ids, positions, intermediate_tensors, inputs_embeds)  # [T, H]
        if self.is_mlp:
            side = self.mlp_input[: hidden.shape[0]]  # [T, H], written by the tap during the base's pass
        else:  # token ids always: prompt embeddings are refused with a Memory Decoder (settings.check_supported)
            side = self.memory(input_ids, positions)  # [T, H_mem]
        return torch.cat([hidden, side.to(hidden.dtype)], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, base hidden + side] -> [N, V] float32: log p_mix shifted by logsumexp of the base's logits.

        Under tensor parallelism vLLM all-gathers both models' logits, so every rank mixes whole rows.
        """
        base_h, side = hidden_states.split([self.base_width, hidden_states.shape[-1] - self.base_width], dim=-1)
        base_logits = self.base.compute_logits(base_h)  # [N, V]
        mem_logits = self.memory(side) if self.is_mlp else self.memory.compute_logits(side)  # [N, V_mem]
        return mixed_scores(base_logits, mem_logits, self.settings.vocab, self.settings.lmbda, self.settings.knn_temp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base's weights from vLLM's loader; the memory's from its own checkpoint. Returns the names loaded."""
        loaded = {f"base.{name}" for name in self.base.load_weights(weights)}
        loaded |= {f"memory.{name}" for name in self.memory.load_weights(_memory_weights(self.settings.memory))}
        return loaded


def mixed_scores(base_logits: torch.Tensor, mem_logits: torch.Tensor, vocab: int, lmbda: float,
                 knn_temp: float) -> torch.Tensor:
    """What vLLM samples from: log p_mix + logsumexp(base) over the first `vocab` tokens, -inf beyond.

    base_logits : [N, V] (V >= vocab); mem_logits : [N, V_mem] (V_mem >= vocab; its rows beyond are dropped)
    Returns [N, V] float32.
    """
    base, mem = base_logits[:, :vocab], mem_logits[:, :vocab]
    logp = ops.joint_logprobs(base, mem, lmbda=lmbda, knn_temp=knn_temp)  # [N, vocab] float32
    out = torch.full(base_logits.shape, float("-inf"), dtype=torch.float32, device=base_logits.device)
    out[:, :vocab] = logp + torch.logsumexp(base.float(), dim=-1, keepdim=True)
    return out


def _memory_weights(memory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The memory checkpoint's tensors, one weight file at a time."""
    for path in checkpoint.weight_files(memory):
        yield from checkpoint.load_state_dict([path]).items()
