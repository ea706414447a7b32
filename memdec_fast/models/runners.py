"""Runners: one interface per kind of model, for the model pair (:mod:`memdec_fast.models.pair`).

- :class:`LeanRunner` (GPT-2, the Llama family) runs over caches its caller owns (:meth:`LeanRunner.slot_forward`):
  one row per request, each row at its own length, as the engine's decode step lays them out.
- :class:`HFRunner` drives any transformers causal LM over a left-padded batch with its own dynamic cache
  (``prefill``, ``decode``, ``keep_rows``): the fallback for architectures without a lean model. Positions count
  only real tokens, so a left-padded row sees the positions it would see alone.

Both score a full window without any cache (``forward``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator

import torch

from memdec_fast.models import checkpoint, llama
from memdec_fast.models.cache import Packing, SlotCache
from memdec_fast.models.gpt2 import GPT2
from memdec_fast.models.llama import Llama

logger = logging.getLogger(__name__)

Output = tuple[torch.Tensor, torch.Tensor | None]
"""(logits [B, V_model], hidden [B, D] or None); with forward(), both carry a T axis."""


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # attention_mask: [B, T] bool -> [B, T] int64, 0 on the left padding
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class LeanRunner:
    """Drives a memdec_fast model with a static cache (:class:`GPT2`, :class:`Llama`): the subclasses say which.

    Attributes
    ----------
    vocab_size, max_context, hidden_size, num_layers : int
    kv_heads, head_dim : int, the shape of one block's cache [B, kv_heads, S, head_dim]
    device : of the weights and caches
    """

    def __init__(self, model: GPT2 | Llama):
        self.model = model
        self.hidden_layer: int | None = None
        self.device = next(model.parameters()).device
        _, self.kv_heads, _, self.head_dim = model.kv_shape(1, 1)

    def new_slot_caches(self, slots: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed per-block (k, v) [slots, Hkv, length, Dh] for :meth:`slot_forward`; the caller owns them."""
        return self.model.new_caches(slots, length)

    @torch.inference_mode()
    def slot_forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]],
        rows: slice | torch.Tensor, length: int, slots: torch.Tensor | None = None, last: torch.Tensor | None = None,
        packing: Packing | None = None,
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
        packing : Packing, optional; where the real tokens of right-padded rows are (only they are computed)

        Returns
        -------
        (logits [B, V_model], hidden [B, D] or None)
        """
        kv = [SlotCache(k, v, rows, length) for k, v in caches]
        mask = (torch.arange(length, device=self.device) <= positions[:, :, None])[:, None]  # [B, 1, T, length]
        slots = positions if slots is None else slots
        logits, hidden = self.model(tokens, positions, mask, slots, self.hidden_layer, tail=1, caches=kv, last=last,
                                    packing=packing)
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


def lean_reason(name_or_path: str | os.PathLike) -> str | None:
    """Why a checkpoint cannot run on memdec_fast's lean models (None: it can).

    GPT-2 always can; a Llama, Qwen2 or Mistral config that :class:`Llama` does not compute (a sliding
    window shorter than the context, experts, another rope type...) cannot, and neither can any other
    architecture. A Llama-family config that is plainly broken raises ValueError naming the checkpoint.
    """
    config = checkpoint.load_config(name_or_path)
    model_type = config.get("model_type")
    if model_type == "gpt2":
        return None
    if model_type not in llama.MODEL_TYPES:
        return f"no lean model for model_type {model_type!r}"
    try:
        return llama.unsupported(llama.with_defaults(config))
    except ValueError as err:
        raise ValueError(f"{os.fspath(name_or_path)}: {err}") from err


def load_causal_lm(
    name_or_path: str | os.PathLike, device: torch.device, dtype: torch.dtype, lean: bool = True
) -> LeanRunner | HFRunner:
    """A runner for a causal LM checkpoint: our GPT-2 or Llama where possible, else transformers.

    A checkpoint without a lean model (:func:`lean_reason`) runs in transformers after one log line
    naming the reason. With ``lean=False`` every architecture runs in transformers.
    """
    config = checkpoint.load_config(name_or_path)
    checkpoint.weight_files(name_or_path)  # fail early, and clearly, when the weights are missing
    reason = lean_reason(name_or_path) if lean else "lean=False"
    if reason is None:
        model_class, runner = (GPT2, GPT2Runner) if config.get("model_type") == "gpt2" else (Llama, LlamaRunner)
        return runner(model_class.from_pretrained(name_or_path, device=device, dtype=dtype))
    if lean:
        logger.warning("memdec_fast: %s runs in transformers, not on memdec_fast's lean models: %s",
                       os.fspath(name_or_path), reason)
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
