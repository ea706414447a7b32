"""GPT-2 over caller-owned static KV caches, in the style of gpt-fast.

One module covers gpt2, -medium, -large, -xl and any GPT2Config. Decode has
static shapes: the caches are allocated by the caller (:meth:`GPT2.new_caches`), and
the cache slots, positions and attention mask arrive as tensors, so a decode step
holds no data-dependent Python control flow and can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from memdec_fast.models import checkpoint
from memdec_fast.models.cache import CachedDecoder, Packing, SlotCache, attend_cache, keep_positions
from memdec_fast.models.linear import Linear, linear


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Config:
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


def activation(name: str) -> nn.Module:
    """The activation named by a GPT-2 config, as transformers computes it (to float rounding)."""
    from transformers.activations import ACT2FN

    if name == "gelu_new":  # the same tanh formula in one kernel, not eight (gpt2-xl + gpt2 run 60 per step)
        return nn.GELU(approximate="tanh")
    if name not in ACT2FN:
        raise ValueError(f"activation_function: unknown activation {name!r}")
    return ACT2FN[name]


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        d = config.n_embd
        self.n_head, self.head_dim = config.n_head, d // config.n_head
        self.c_attn = Linear(d, 3 * d)
        self.c_proj = Linear(d, d)
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None,
        cache: SlotCache | None = None, packing: Packing | None = None,
    ) -> torch.Tensor:
        # x: [B, T, D], or [N, D] with `packing`; mask: [B, 1, T, S] bool (True = attend) or None for causal; with
        # `cache`, input_pos [B, T]: each token's slot in its row of that cache
        qkv = self.c_attn(x)  # [B, T, 3D], or [N, 3D] with `packing`
        D = qkv.shape[-1] // 3
        if packing is not None:  # the real tokens only: q, k, v [N, H, Dh]
            q, k, v = (t.view(-1, self.n_head, self.head_dim) for t in qkv.split(D, dim=-1))
            return self.c_proj(attend_cache(q, k, v, mask, input_pos, cache, self.scale, packing).reshape(-1, D))
        B, T = qkv.shape[:2]
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in qkv.split(D, dim=-1))
        if mask is None:  # causal over the T inputs, no cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = attend_cache(q, k, v, mask, input_pos, cache, self.scale)  # [B, H, T, Dh]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.c_proj = Linear(inner, config.n_embd)
        self.act = activation(config.activation_function)
        self.gelu_tanh = config.activation_function == "gelu_new"  # fused into c_fc's GEMM (see models.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_tanh:
            return self.c_proj(linear(x, self.c_fc.weight, self.c_fc.bias, gelu_tanh=True))
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)


class GPT2(CachedDecoder):
    """GPT2LMHeadModel's forward, with a static cache and access to one MLP input.

    Example
    -------
    >>> model = GPT2.from_pretrained("gpt2", device="cpu", dtype=torch.float32)
    >>> logits, _ = model(torch.tensor([[464, 3290]]), torch.tensor([[0, 1]]))
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.n_embd, config.vocab_size, bias=False)

    def attention_blocks(self) -> nn.ModuleList:
        return self.h

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        c = self.config
        return batch, c.n_head, length, c.n_embd // c.n_head

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
        """Logits of every input position, and optionally the input of one block's MLP.

        Parameters
        ----------
        idx : Tensor [B, T] int64
        positions : Tensor [B, T] int64
            Position ids; with left padding they count only real tokens.
        mask : Tensor [B, 1, T, S] bool, optional
            True where a query may attend a key; None means causal over the T inputs.
        input_pos : Tensor [B, T] int64, optional (with caches)
            Each token's slot in its row of the caches.
        hidden_layer : int, optional
            Block whose MLP input (after ln_2) is returned, Python-style index.
        tail : int, optional
            Return logits (and hidden) for the last `tail` positions only (T' = tail),
            so that scoring a window's tail never holds the whole window's logits.
        caches : list of SlotCache, one per block, optional
            Caches owned by the caller (e.g. the engine's slots); None runs without a
            cache (S == T).
        last : Tensor [B] int64, optional
            Return logits (and hidden) for one position per row only (T' = 1): row
            b's position last[b] (e.g. the last real token of a right-padded row).
        packing : Packing, optional
            Where the real tokens of a right-padded batch are: the blocks compute those only.

        Returns
        -------
        logits : Tensor [B, T', vocab_size]
        hidden : Tensor [B, T', n_embd] or None
        """
        x = self.wte(idx) + self.wpe(positions)  # [B, T, D]
        if packing is not None:
            x = packing.pack(x)  # [N, D]
        hidden = None
        tap = None if hidden_layer is None else hidden_layer % len(self.h)
        for i, block in enumerate(self.h):
            x = x + block.attn(block.ln_1(x), mask, input_pos, None if caches is None else caches[i], packing)
            h = block.ln_2(x)
            if i == tap:
                hidden = h
            x = x + block.mlp(h)
        if packing is not None:
            x, hidden = packing.unpack(x), None if hidden is None else packing.unpack(hidden)
        x, hidden = keep_positions(x, hidden, last, tail)
        x = self.ln_f(x)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, weight), hidden

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> GPT2:
        """Load a Hugging Face GPT-2 checkpoint (Conv1D weights stored [in, out]).

        Parameters
        ----------
        name_or_path : str or PathLike
            A local directory with config.json and model.safetensors or
            pytorch_model.bin, or a hub name such as "gpt2-xl".
        device, dtype :
            Where and in which precision (float32, float16 or bfloat16) to run.
        """
        where = os.fspath(name_or_path)
        raw = checkpoint.load_config(name_or_path)
        if raw.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{where}: model_type is {raw.get('model_type')!r}, not 'gpt2'")
        config = GPT2Config.from_dict(raw)
        state = checkpoint.load_state_dict(checkpoint.weight_files(name_or_path))
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        tied = config.tie_word_embeddings or "lm_head.weight" not in state
        config.tie_word_embeddings = tied
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        state = {k: v.t() if k.endswith(conv) else v for k, v in state.items()}  # Conv1D [in, out] -> [out, in]
        state = checkpoint.take(state, expected, where)
        model.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, assign=True)
        return model.to(device=device).eval().requires_grad_(False)
