"""Loading the Hugging Face models and tokenizers the pipeline trains from."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Model", "load_lm", "load_tokenizer"]

Model = PreTrainedModel


def load_lm(path: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A causal LM from a Hugging Face directory, float32, in eval mode."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def load_tokenizer(path: str | Path | PreTrainedModel) -> PreTrainedTokenizerBase:
    """The tokenizer saved next to a model; a loaded model needs its tokenizer passed explicitly."""
    if not isinstance(path, (str, Path)):
        raise TypeError("pass tokenizer= when the base is a loaded model rather than a directory")
    return AutoTokenizer.from_pretrained(path)
