"""MLP Memory: a stack of residual MLP blocks reading one hidden state of the base.

Upstream checkpoint format: a GPT2Config (n_layer, n_embd, activation_function)
and weights ``embedding_transform.*`` (only when the base's hidden size
differs), ``h.{i}.ln_1.*``, ``h.{i}.mlp.c_fc.*``, ``h.{i}.mlp.c_proj.*`` (Conv1D,
stored [in, out]), ``ln_f.*`` and ``lm_head.weight``. An optional sibling or
parent ``mlp_memory_config.json`` holds ``layer_position``: the base block
whose MLP input (after ln_2) the memory reads; -1, the default, is the last.
Tokens are independent: no attention, no cache.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from memdec_fast.models import checkpoint
from memdec_fast.models.gpt2 import MLP, GPT2Config
from memdec_fast.models.linear import Linear

MLP_CONFIG = "mlp_memory_config.json"
CONV1D_WEIGHTS = (".mlp.c_fc.weight", ".mlp.c_proj.weight")  # stored [in, out], as upstream's Conv1D holds them


class MLPBlock(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln_1(x))


class MLPMemory(nn.Module):
    """Next-token logits from the base's hidden state entering block `layer_position`'s MLP.

    Example
    -------
    >>> memory = MLPMemory.from_pretrained("path/to/mlp_memory")
    >>> logits = memory(hidden)  # hidden: [..., input_dim] -> logits: [..., vocab_size]
    """

    def __init__(self, config: GPT2Config, input_dim: int | None = None, layer_position: int = -1):
        super().__init__()
        self.config, self.layer_position = config, layer_position
        self.embedding_transform = None if input_dim is None else Linear(input_dim, config.n_embd)
        self.h = nn.ModuleList(MLPBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

    @property
    def input_dim(self) -> int:
        """Size of the hidden state the memory reads."""
        t = self.embedding_transform
        return self.config.n_embd if t is None else t.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., input_dim] -> [..., vocab_size]
        x = x.to(self.lm_head.weight.dtype)
        if self.embedding_transform is not None:
            x = self.embedding_transform(x)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> MLPMemory:
        """Load an MLP Memory checkpoint in the upstream format (see the module docstring)."""
        where = os.fspath(name_or_path)
        config = GPT2Config.from_dict(checkpoint.load_config(name_or_path))
        layer_position = read_layer_position(name_or_path)
        state = checkpoint.load_state_dict(checkpoint.weight_files(name_or_path))
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        t = state.get("embedding_transform.weight")
        with torch.device("meta"):
            model = cls(config, None if t is None else t.shape[1], layer_position)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in state.items()}  # -> [out, in]
        state = checkpoint.take(state, expected, where)
        model.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, assign=True)
        return model.to(device=device).eval().requires_grad_(False)


def _config_paths(name_or_path: str | os.PathLike) -> list[str]:
    """Where an mlp_memory_config.json may live: beside the weights, or in the parent directory."""
    root = os.fspath(name_or_path)
    if os.path.isdir(root):
        paths = [os.path.join(root, MLP_CONFIG), os.path.join(os.path.dirname(os.path.abspath(root)), MLP_CONFIG)]
        return [p for p in paths if os.path.isfile(p)]
    found = checkpoint.resolve(root, MLP_CONFIG)
    return [found] if found else []


def read_layer_position(name_or_path: str | os.PathLike) -> int:
    """layer_position from the nearest mlp_memory_config.json, -1 without one."""
    paths = _config_paths(name_or_path)
    if not paths:
        return -1
    value = checkpoint.read_json(paths[0]).get("layer_position", -1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{paths[0]}: layer_position must be an int, got {value!r}")
    return value


def detect_memory_type(name_or_path: str | os.PathLike, by_weights: bool = False) -> str | None:
    """"mlp" for an MLP Memory checkpoint, "decoder" for a causal LM.

    An MLP Memory has an mlp_memory_config.json nearby, or MLP weights
    (h.0.mlp.c_fc) without any attention weights. With ``by_weights=True`` only
    the weights decide, and None means they do not say (neither attention nor
    MLP blocks).
    """
    if not by_weights and _config_paths(name_or_path):
        return "mlp"
    names = {k.removeprefix("transformer.") for k in checkpoint.weight_names(checkpoint.weight_files(name_or_path))}
    has_attn = any(".attn." in k or "self_attn" in k for k in names)
    if by_weights:
        return "decoder" if has_attn else "mlp" if "h.0.mlp.c_fc.weight" in names else None
    return "mlp" if "h.0.mlp.c_fc.weight" in names and not has_attn else "decoder"
