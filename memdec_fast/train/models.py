"""Loading the Hugging Face models and tokenizers the pipeline trains from."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Model", "forward_cached", "load_lm", "load_tokenizer"]

Model = PreTrainedModel


def load_lm(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A causal LM from a Hugging Face directory, float32, in eval mode."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar from transformers: the pipeline's own bars are the ones worth showing."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path | PreTrainedModel) -> PreTrainedTokenizerBase:
    """The tokenizer saved next to a model; a loaded model needs its tokenizer passed explicitly."""
    if not isinstance(path, (str, Path)):
        raise TypeError("pass tokenizer= when the base is a loaded model rather than a directory")
    return AutoTokenizer.from_pretrained(path)


def forward_cached(model: PreTrainedModel, ids: torch.Tensor, cache=None):
    """One forward with a KV cache: (output, the new cache).

    transformers 5.x names the cache ``cache`` (``past_key_values`` is deprecated
    there, with a FutureWarning on every call); older versions only know
    ``past_key_values``. The name is taken from the model's signature.
    """
    if "cache" in inspect.signature(model.forward).parameters:
        out = model(ids, cache=cache, use_cache=True)
        return out, out.cache
    out = model(ids, past_key_values=cache, use_cache=True)
    return out, out.past_key_values
