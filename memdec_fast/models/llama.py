"""Llama, Qwen2/Qwen2.5 and Mistral with a static KV cache, in the style of gpt-fast.

One module covers the family: RMSNorm, rotary embeddings (default, linear and
Llama 3 scaling), grouped-query attention, SwiGLU, tied or untied embeddings,
Qwen2's q/k/v biases and Llama's attention_bias / mlp_bias. The forward has the
same signature and cache contract as :class:`memdec_fast.models.gpt2.GPT2`, so one
runner drives both, and a decode step can be captured in a CUDA graph.

What the module does not compute it refuses by name (:func:`unsupported`): a
sliding window shorter than the context, mixtures of experts, other rope types,
quantized weights; the caller then falls back to transformers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memdec_fast.models import checkpoint
from memdec_fast.models.cache import CachedDecoder, Packing, SlotCache, attend_cache, keep_positions
from memdec_fast.models.linear import Linear, linear

MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _rope(d: dict) -> dict:
    """The rope parameters of a config.json: transformers 5's ``rope_parameters`` or the older ``rope_scaling``
    plus a top-level ``rope_theta``; always with ``rope_type`` and ``rope_theta``."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    if d.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    return rope


def _sliding(d: dict) -> bool:
    """Whether any layer of this config attends through a sliding window (as transformers reads the keys)."""
    if d.get("sliding_window") is None:
        return False
    if "sliding_attention" in (d.get("layer_types") or ()):
        return True
    if d.get("model_type") == "qwen2":  # windowed layers only with use_sliding_window, from max_window_layers on
        return bool(d.get("use_sliding_window")) and d.get("max_window_layers", 28) < d["num_hidden_layers"]
    return d.get("model_type") == "mistral"


def with_defaults(d: dict) -> dict:
    """config.json `d` completed with transformers' defaults for its model_type (Mistral's default window is 4096,
    Qwen2's intermediate size 22016...), so that a sparse config means here what it means in transformers."""
    from transformers import AutoConfig

    try:
        full = AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"}).to_dict()
    except Exception as err:  # config classes raise many types on bad values
        raise ValueError(f"transformers cannot read this {d.get('model_type')!r} config ({err})") from err
    return full | {k: v for k, v in d.items() if k not in full}


def unsupported(d: dict) -> str | None:
    """Why :class:`Llama` cannot run the config.json `d` as transformers would, or None when it can.

    Pass the config through :func:`with_defaults` first, or keys it leaves out count as absent.
    """
    if d.get("model_type") not in MODEL_TYPES:
        return f"model_type {d.get('model_type')!r} is not one of {MODEL_TYPES}"
    moe = [k for k in _MOE_KEYS if d.get(k)]
    if moe:
        return f"mixture of experts ({moe[0]}={d[moe[0]]})"
    if d.get("quantization_config"):
        return "quantized weights (quantization_config)"
    rope = _rope(d)
    if any(isinstance(v, dict) for v in rope.values()):
        return "rope parameters per layer type"
    if rope["rope_type"] not in ROPE_TYPES:
        return f"rope_type {rope['rope_type']!r} (supported: {', '.join(ROPE_TYPES)})"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor={rope['partial_rotary_factor']}"
    context = d.get("max_position_embeddings", 2048)
    if _sliding(d) and d["sliding_window"] < context:
        return f"sliding_window={d['sliding_window']} is shorter than the context ({context} positions)"
    if set(d.get("layer_types") or ()) - {"full_attention", "sliding_attention"}:
        return f"layer_types {sorted(set(d['layer_types']))}"
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} (SwiGLU needs silu)"
    return None


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: dict | None = None  # rope_type, rope_theta and the scaling keys
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """From a Llama, Qwen2 or Mistral config.json (call :func:`unsupported` first)."""
        heads = d["num_attention_heads"]
        qwen = d.get("model_type") == "qwen2"
        bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=_rope(d), qkv_bias=qwen or bias, o_bias=bias and not qwen, mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )


def inv_frequencies(config: LlamaConfig) -> torch.Tensor:
    """[head_dim / 2] float32 rotary frequencies, as transformers computes them for each rope type."""
    rope, dim = config.rope or {"rope_type": "default", "rope_theta": 10000.0}, config.head_dim
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope["rope_type"] == "linear":
        return inv / rope["factor"]
    if rope["rope_type"] != "llama3":
        return inv
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope.get("original_max_position_embeddings", config.max_position_embeddings)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)  # long waves slow down, short ones stay
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, Dh] or [N, H, Dh]; cos, sin: [B, 1, T, Dh] or [N, 1, Dh] (the two halves of Dh share a frequency)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # in float32, as transformers, whatever the weights' dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.n_head * self.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
        input_pos: torch.Tensor | None, cache: SlotCache | None = None, packing: Packing | None = None,
    ) -> torch.Tensor:
        # x: [B, T, D], or [N, D] with `packing`; mask, input_pos, cache: as in GPT2's Attention
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, *], or [N, *] with `packing`
        if packing is not None:  # the real tokens only: q [N, H, Dh], k, v [N, Hkv, Dh]
            q = rotate(q.view(-1, self.n_head, self.head_dim), *rope)  # rope: [N, 1, Dh] each, packed by the model
            k = rotate(k.view(-1, self.n_kv, self.head_dim), *rope)
            y = attend_cache(q, k, v.view(-1, self.n_kv, self.head_dim), mask, input_pos, cache, packing=packing)
            return self.o_proj(y.reshape(y.shape[0], -1))
        B, T = q.shape[:2]
        q = rotate(q.view(B, T, self.n_head, self.head_dim).transpose(1, 2), *rope)  # [B, H, T, Dh]
        k = rotate(k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2), *rope)  # [B, Hkv, T, Dh]
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if mask is None:  # causal over the T inputs, no cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head > self.n_kv)
        else:
            y = attend_cache(q, k, v, mask, input_pos, cache)  # [B, H, T, Dh]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    @property
    def attn(self) -> Attention:  # the name the runners and GPT-2 use
        return self.self_attn


class Llama(CachedDecoder):
    """LlamaForCausalLM's forward (and Qwen2's, Mistral's), with a static cache and access to one MLP input.

    The forward's arguments and returns are those of :meth:`memdec_fast.models.gpt2.GPT2.forward`;
    the hidden state returned for `hidden_layer` is block L's MLP input, after post_attention_layernorm.

    Example
    -------
    >>> model = Llama.from_pretrained("Qwen/Qwen2.5-0.5B", dtype=torch.bfloat16)
    >>> logits, _ = model(torch.tensor([[9707, 11]]), torch.tensor([[0, 1]]))
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.register_buffer("inv_freq", inv_frequencies(config), persistent=False)

    def attention_blocks(self) -> nn.ModuleList:
        return self.layers

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        c = self.config
        return batch, c.num_key_value_heads, length, c.head_dim

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        hidden_layer: int | None = None,
        tail: int | None = None,
        caches: list[SlotCache] | None = None,
        last: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T', V] and optionally block `hidden_layer`'s MLP input [B, T', D]; see GPT2.forward."""
        x = self.embed_tokens(idx)  # [B, T, D]
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, Dh/2], float32 as in transformers
        freqs = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, Dh]
        rope = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        hidden = None
        tap = None if hidden_layer is None else hidden_layer % len(self.layers)
        if packing is not None:
            x = packing.pack(x)  # [N, D]
            rope = tuple(packing.pack(t[:, 0])[:, None] for t in rope)  # [N, 1, Dh]
        for i, block in enumerate(self.layers):
            x = x + block.self_attn(block.input_layernorm(x), rope, mask, input_pos,
                                    None if caches is None else caches[i], packing)
            h = block.post_attention_layernorm(x)
            if i == tap:
                hidden = h
            x = x + block.mlp(h)
        if packing is not None:
            x, hidden = packing.unpack(x), None if hidden is None else packing.unpack(hidden)
        x, hidden = keep_positions(x, hidden, last, tail)
        x = self.norm(x)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, weight), hidden

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Llama:
        """Load a Hugging Face Llama, Qwen2 or Mistral checkpoint (safetensors, sharded or not, or .bin).

        Raises ValueError naming the reason for a config this module does not compute (see
        :func:`unsupported`), or for weights that do not fit the config.
        """
        where = os.fspath(name_or_path)
        raw = checkpoint.load_config(name_or_path)
        if raw.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"{where}: {unsupported(raw)}")
        try:
            full = with_defaults(raw)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        reason = unsupported(full)
        if reason is not None:
            raise ValueError(f"{where}: {reason}")
        config = LlamaConfig.from_dict(full)
        files = checkpoint.weight_files(name_or_path)
        shapes = {k.removeprefix("model."): v for k, v in checkpoint.weight_shapes(files).items()}
        config.tie_word_embeddings = config.tie_word_embeddings or "lm_head.weight" not in shapes
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = [k for k in expected if k not in shapes]
        if missing:  # from the headers, before gigabytes are read
            raise ValueError(f"{where}: its weights do not fit its config.json ({raw['model_type']!r}): "
                             f"{len(missing)} of {len(expected)} tensors missing, e.g. {missing[:3]}")
        state = {k.removeprefix("model."): v for k, v in checkpoint.load_state_dict(files).items()}
        state = checkpoint.take(state, expected, where)
        model.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, assign=True)
        model.inv_freq = inv_frequencies(config)  # the meta build left it empty
        return model.to(device=device).eval().requires_grad_(False)
