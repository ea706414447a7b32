"""Loading the Hugging Face models and tokenizers the pipeline trains from."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memdec_fast.models.runners import cache_argument, quiet_loading

__all__ = ["Model", "forward_cached", "load_lm", "load_tokenizer"]

Model = PreTrainedModel


def load_lm(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A causal LM from a Hugging Face directory, float32, in eval mode."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


def load_tokenizer(path: str | Path | PreTrainedModel) -> PreTrainedTokenizerBase:
    """The tokenizer saved next to a model; a loaded model needs its tokenizer passed explicitly."""
    if not isinstance(path, (str, Path)):
        raise TypeError("pass tokenizer= when the base is a loaded model rather than a directory")
    return AutoTokenizer.from_pretrained(path)


def forward_cached(model: PreTrainedModel, ids: torch.Tensor, cache=None):
    """One forward with a KV cache: (output, the new cache), under the cache argument's name in this transformers
    version (:func:`memdec_fast.models.runners.cache_argument`)."""
    name = cache_argument(model)
    out = model(ids, **{name: cache}, use_cache=True)
    return out, getattr(out, name)
