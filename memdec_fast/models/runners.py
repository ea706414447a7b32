"""Runners: one interface over a left-padded batch, for our lean models and for any transformers LM.

A runner owns its cache, the position of each row and the attention mask, so
the generator drives any causal LM the same way:

- ``prefill(input_ids, attention_mask, length)`` runs the prompts and returns the
  last position's logits (and the hidden state named by ``hidden_layer``);
- ``decode(tokens)`` appends one token per row;
- ``keep_rows(rows)`` drops finished rows from the batch;
- ``forward(input_ids)`` scores a full unpadded window without any cache.

Lean runners (GPT-2, Llama family) also serve the engine's slots (:meth:`LeanRunner.slot_forward`):
a cache owned by the caller, one row per request, each row at its own length.

Positions count only real tokens, so a left-padded row sees the same
positions it would see alone.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from memdec_fast.models import checkpoint, llama
from memdec_fast.models.cache import KVCache, SlotCache
from memdec_fast.models.gpt2 import GPT2
from memdec_fast.models.llama import Llama

logger = logging.getLogger(__name__)

Output = tuple[torch.Tensor, torch.Tensor | None]
"""(logits [B, V_model], hidden [B, D] or None); with forward(), both carry a T axis."""


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # attention_mask: [B, T] bool -> [B, T] int64, 0 on the left padding
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class DecodeState:
    """Everything a lean runner's decode step reads and advances in place; a CUDA graph holds these addresses."""

    caches: list[tuple[torch.Tensor, torch.Tensor]]  # per block (k, v): [B, Hkv, S, Dh]
    valid: torch.Tensor  # [B, S] bool: cache slots holding a real key
    positions: torch.Tensor  # [B, 1] int64: next position id of each row
    input_pos: torch.Tensor  # [1] int64: next cache slot


class LeanRunner:
    """Drives a memdec_fast model with a static cache (:class:`GPT2`, :class:`Llama`): the subclasses say which.

    Attributes
    ----------
    vocab_size, max_context, hidden_size, num_layers : int
    kv_heads, head_dim : int, the shape of one block's cache [B, kv_heads, S, head_dim]
    dtype, device : of the weights and caches
    """

    def __init__(self, model: GPT2 | Llama):
        self.model, self._blocks = model, model.attention_blocks()
        self.hidden_layer: int | None = None
        self.valid: torch.Tensor | None = None
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        _, self.kv_heads, _, self.head_dim = model.kv_shape(1, 1)

    @property
    def kv_width(self) -> int:
        """kv_heads x head_dim: the elements of one key (or value) of one token in one block."""
        return self.kv_heads * self.head_dim

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int) -> Output:
        # input_ids, attention_mask: [B, T]; length: cache slots S >= T
        B, T = input_ids.shape
        self.model.setup_caches(B, length)  # kept, like the state below, when the shape is unchanged
        if self.valid is None or self.valid.shape != (B, length):
            self.valid = torch.empty(B, length, dtype=torch.bool, device=self.device)
            self.positions = torch.empty(B, 1, dtype=torch.int64, device=self.device)
            self.input_pos = torch.empty(1, dtype=torch.int64, device=self.device)
        self.valid.zero_()
        self.valid[:, :T] = attention_mask  # [B, S] keys that exist
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        # a padding query attends itself too, so that no row is all-masked (SDPA would give NaN)
        mask = causal & (attention_mask[:, None, :] | torch.eye(T, dtype=torch.bool, device=self.device))  # [B, T, T]
        mask = torch.nn.functional.pad(mask, (0, length - T))[:, None]  # [B, 1, T, S]
        slots = torch.arange(T, device=self.device)
        # tail=1: only the last position's logits (and MLP input) are needed, so no [B, T, V] tensor is built
        logits, hidden = self.model(input_ids, _positions(attention_mask), mask, slots, self.hidden_layer, tail=1)
        self.positions.copy_(attention_mask.sum(-1, keepdim=True))  # [B, 1] next position
        self.input_pos.fill_(T)  # [1] next slot
        return logits[:, -1], None if hidden is None else hidden[:, -1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> Output:
        # tokens: [B]; static shapes: slot, positions and mask are tensors updated in place
        self.valid.index_fill_(1, self.input_pos, True)
        mask = self.valid[:, None, None, :]  # [B, 1, 1, S]
        logits, hidden = self.model(tokens[:, None], self.positions, mask, self.input_pos, self.hidden_layer)
        self.positions += 1
        self.input_pos += 1
        return logits[:, 0], None if hidden is None else hidden[:, 0]

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.model.keep_rows(rows)
        self.valid, self.positions = self.valid[rows], self.positions[rows]

    def bind(self, state: DecodeState) -> None:
        """Prefill and decode into `state`'s tensors from now on (their shapes must then match)."""
        for block, (k, v) in zip(self._blocks, state.caches, strict=True):
            block.attn.kv_cache = KVCache(k, v)  # a fresh module: keep_rows elsewhere cannot swap our tensors
        self.valid, self.positions, self.input_pos = state.valid, state.positions, state.input_pos

    def unbind(self) -> None:
        """Let go of the cache and decode state, bound or own (so that their memory can be freed); the next
        prefill allocates new ones."""
        for block in self._blocks:
            block.attn.kv_cache = None
        self.valid = self.positions = self.input_pos = None

    def new_slot_caches(self, slots: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed per-block (k, v) [slots, Hkv, length, Dh] for :meth:`slot_forward`; the caller owns them."""
        return self.model.new_caches(slots, length)

    @torch.inference_mode()
    def slot_forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]],
        rows: slice | torch.Tensor, length: int, slots: torch.Tensor | None = None, last: torch.Tensor | None = None,
    ) -> Output:
        """Run tokens in the cache rows `rows`, each row at its own positions; one position's outputs per row.

        A row's token at position p is written to cache slot p (or slots[b, t]) and attends
        the row's slots s <= p, so rows of any lengths share one batch without left padding.
        With a slice of rows, static shapes and no host reads: a decode step of this call can
        be captured in a CUDA graph.

        Parameters
        ----------
        tokens, positions : Tensor [B, T] int64
            Every position < length.
        caches : per block (k, v) Tensors [N, Hkv, S, Dh], from :meth:`new_slot_caches`
        rows : slice of B cache rows (attention reads views), or LongTensor [B] (it gathers)
        length : int, the slots [0, length) attention reads (length <= S)
        slots : Tensor [B, T] int64, optional
            Where each token's key and value go; default its position. Padding tokens of a
            right-padded batch can go to a scratch slot >= length, which nothing reads.
        last : Tensor [B] int64, optional; the index in T whose outputs each row returns (default T - 1)

        Returns
        -------
        (logits [B, V_model], hidden [B, D] or None)
        """
        kv = [SlotCache(k, v, rows, length) for k, v in caches]
        mask = (torch.arange(length, device=self.device) <= positions[:, :, None])[:, None]  # [B, 1, T, length]
        slots = positions if slots is None else slots
        logits, hidden = self.model(tokens, positions, mask, slots, self.hidden_layer, tail=1, caches=kv, last=last)
        return logits[:, -1], None if hidden is None else hidden[:, -1]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, last: int | None = None) -> Output:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=self.device).expand_as(input_ids)
        return self.model(input_ids, positions, hidden_layer=self.hidden_layer, tail=last)


class GPT2Runner(LeanRunner):
    """Drives :class:`GPT2` with its static cache."""

    def __init__(self, model: GPT2):
        super().__init__(model)
        c = model.config
        self.vocab_size, self.max_context, self.hidden_size, self.num_layers = (
            c.vocab_size, c.n_positions, c.n_embd, c.n_layer,
        )


class LlamaRunner(LeanRunner):
    """Drives :class:`Llama` (Llama, Qwen2, Mistral) with its static cache."""

    def __init__(self, model: Llama):
        super().__init__(model)
        c = model.config
        self.vocab_size, self.max_context, self.hidden_size, self.num_layers = (
            c.vocab_size, c.max_position_embeddings, c.hidden_size, c.num_hidden_layers,
        )


class HFRunner:
    """Drives any transformers causal LM (eager, with its own dynamic cache)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.hidden_layer: int | None = None
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_context = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2**31 - 1
        self.hidden_size = c.hidden_size
        self.num_layers = c.num_hidden_layers
        self.device = next(model.parameters()).device
        self._hook = None
        self._captured: torch.Tensor | None = None

    def _capture(self) -> None:
        """Hook the input of block hidden_layer's MLP (the hook follows hidden_layer when it changes)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.hidden_layer is not None:
            mlp = mlp_blocks(self.model)[self.hidden_layer].mlp
            self._hook = mlp.register_forward_pre_hook(lambda _m, args: setattr(self, "_captured", args[0]))

    def _run(self, cache=None, **kw) -> Output:
        self._capture()
        if cache is None:
            out = self.model(**kw, use_cache=False)
        else:
            name = cache_argument(self.model)
            out = self.model(**kw, **{name: cache}, use_cache=True)
            self.cache = getattr(out, name)
        hidden, self._captured = self._captured, None
        return out.logits, hidden

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int) -> Output:
        from transformers import DynamicCache

        self.mask = attention_mask.long()  # [B, T], grows by one column per step
        logits, hidden = self._run(
            input_ids=input_ids, attention_mask=self.mask, position_ids=_positions(attention_mask),
            cache=DynamicCache(config=self.model.config),
        )
        self.positions = self.mask.sum(-1, keepdim=True)
        return logits[:, -1], None if hidden is None else hidden[:, -1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> Output:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        logits, hidden = self._run(
            input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions, cache=self.cache
        )
        self.positions = self.positions + 1
        return logits[:, -1], None if hidden is None else hidden[:, -1]

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.positions = self.mask[rows], self.positions[rows]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, last: int | None = None) -> Output:
        logits, hidden = self._run(input_ids=input_ids)
        if last is None:
            return logits, hidden
        return logits[:, -last:], None if hidden is None else hidden[:, -last:]


def mlp_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """A causal LM's blocks, each with an ``mlp`` (GPT-2's h, Llama's and GPT-NeoX's layers, OPT's decoder.layers,
    ...), in a transformers model or in vLLM's model of the same family; ValueError when there are none to find."""
    base = getattr(model, "base_model", None) or getattr(model, "transformer", None) or getattr(model, "model", model)
    for path in ("h", "layers", "blocks", "decoder.layers"):
        blocks = base
        for part in path.split("."):
            blocks = getattr(blocks, part, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and hasattr(blocks[0], "mlp"):
            return blocks
    raise ValueError(f"{type(model).__name__}: cannot find its blocks' MLPs")


def cache_argument(model: torch.nn.Module) -> str:
    """The name a transformers model's forward gives its KV cache: ``cache`` in transformers 5.x, where
    ``past_key_values`` is deprecated (a FutureWarning on every call), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _check_transformers_weights(name_or_path: str | os.PathLike, config: dict) -> None:
    """Build the model on the meta device (free) and refuse weights that do not fit it, before transformers would
    fill the gaps with gigabytes of random initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = os.fspath(name_or_path)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))
    except Exception as err:  # unknown model types and bad configs raise many types
        raise ValueError(f"{where}: transformers cannot build this config ({err})") from err
    shapes = checkpoint.weight_shapes(checkpoint.weight_files(name_or_path))
    prefixes = ("", f"{model.base_model_prefix}.")
    found = {k.removeprefix(p): v for k, v in shapes.items() for p in prefixes if k.startswith(p)}
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k.removeprefix(f"{model.base_model_prefix}.") not in found and k not in found
               and k not in tied and not (config.get("tie_word_embeddings", True) and k.endswith("lm_head.weight"))]
    if missing:
        raise ValueError(f"{where}: its weights do not fit its config.json ({config.get('model_type')!r}): "
                         f"{len(missing)} of {len(expected)} tensors missing, e.g. {missing[:3]}")


def load_causal_lm(
    name_or_path: str | os.PathLike, device: torch.device, dtype: torch.dtype, lean: bool = True
) -> LeanRunner | HFRunner:
    """A runner for a causal LM checkpoint: our GPT-2 or Llama where possible, else transformers.

    A Llama, Qwen2 or Mistral config that :class:`Llama` does not compute (a sliding window
    shorter than the context, experts, another rope type...) runs in transformers after one
    log line naming the reason. With ``lean=False`` every architecture runs in transformers.
    """
    config = checkpoint.load_config(name_or_path)
    checkpoint.weight_files(name_or_path)  # fail early, and clearly, when the weights are missing
    model_type = config.get("model_type")
    if lean and model_type == "gpt2":
        return GPT2Runner(GPT2.from_pretrained(name_or_path, device=device, dtype=dtype))
    if lean and model_type in llama.MODEL_TYPES:
        try:
            reason = llama.unsupported(llama.with_defaults(config))
        except ValueError as err:
            raise ValueError(f"{os.fspath(name_or_path)}: {err}") from err
        if reason is None:
            return LlamaRunner(Llama.from_pretrained(name_or_path, device=device, dtype=dtype))
        logger.warning("memdec_fast: %s runs in transformers, not memdec_fast's lean %s: %s",
                       os.fspath(name_or_path), model_type, reason)
    from transformers import AutoModelForCausalLM

    checkpoint.check_config_against_weights(name_or_path, config)
    _check_transformers_weights(name_or_path, config)
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except Exception as err:  # transformers raises many types for unreadable checkpoints
        raise ValueError(f"{os.fspath(name_or_path)}: transformers could not load it ({err})") from err
    return HFRunner(model.to(device))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar from transformers: normal use prints only our own words and progress bars."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def as_runner(model: torch.nn.Module | LeanRunner | HFRunner) -> LeanRunner | HFRunner:
    """Wrap a loaded model (our GPT2 or Llama, or a transformers causal LM) in its runner."""
    if isinstance(model, (LeanRunner, HFRunner)):
        return model
    if isinstance(model, GPT2):
        return GPT2Runner(model)
    if isinstance(model, Llama):
        return LlamaRunner(model)
    if hasattr(model, "get_output_embeddings") and hasattr(model, "config"):
        return HFRunner(model)
    raise TypeError(f"expected a memdec_fast GPT2 or Llama, or a transformers causal LM, got {type(model).__name__}")
