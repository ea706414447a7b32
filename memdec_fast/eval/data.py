"""Turning evaluation data (a file, text, or token ids) into one 1-D token tensor."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

EvalData = str | os.PathLike | Sequence[str] | Sequence[int] | torch.Tensor | np.ndarray
"""A text file path, a string, a list of strings, or a 1-D sequence of token ids."""

_LINES_PER_CALL = 4096
_FILE_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".csv", ".tsv", ".md", ".raw", ".tokens")


def check_data(data: EvalData) -> None:
    """Refuse a string that names a path which is not a readable file, before any model loads.

    A string is text to score unless it names an existing file. One that looks
    like a path (a single line ending in a file suffix such as .txt, or holding a
    path separator and no spaces) but names no file raises FileNotFoundError, so
    that a typo in a file name is not scored as text. A directory raises
    IsADirectoryError. To score such a string as text, pass it in a list: [text].
    """
    if not isinstance(data, (str, os.PathLike)):
        return
    path = os.fspath(data)
    if os.path.isdir(path):
        raise IsADirectoryError(f"data: {path} is a directory, not a text file")
    if os.path.isfile(path):
        return
    if not isinstance(data, str):
        raise FileNotFoundError(f"data: no such file: {path}")
    single_line = "\n" not in data and len(data) < 4096
    looks_like_path = data.lower().endswith(_FILE_SUFFIXES) or (os.sep in data and not any(c.isspace() for c in data))
    if single_line and looks_like_path:
        raise FileNotFoundError(f"data: no such file: {data} (to score this string as text, pass it as [text])")


def load_tokens(data: EvalData, tokenizer) -> torch.Tensor:
    """Token ids of `data`, concatenated, as a CPU int64 tensor [N].

    Parameters
    ----------
    data : str, path, list of str, or 1-D ints (list, numpy array or tensor)
        A path (a ``Path``, or a string naming an existing file) is read as
        UTF-8 and tokenized line by line (a string that looks like a path but names
        no file raises, see :func:`check_data`), each line with its ``\\n``, the way
        upstream tokenizes the rows of a ``datasets`` text split: a file holding
        ``"".join(rows)`` gives the same ids. Any other string is tokenized
        whole. The strings of a list are tokenized one by one and concatenated
        with nothing between them. No special tokens (BOS/EOS) are added.
    tokenizer : a Hugging Face tokenizer
        Needed only for text.

    Returns
    -------
    Tensor [N] int64

    Example
    -------
    >>> load_tokens([464, 3290, 318], tokenizer=None)
    tensor([ 464, 3290,  318])
    """
    if isinstance(data, (torch.Tensor, np.ndarray)):
        ids = torch.as_tensor(data)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"data: token ids must be a 1-D integer sequence, got {ids.dtype} of shape {list(ids.shape)}")
        return ids.to(device="cpu", dtype=torch.int64)
    check_data(data)
    if isinstance(data, os.PathLike) or (isinstance(data, str) and os.path.isfile(data)):
        return _tokenize(_read_lines(Path(data)), tokenizer)
    if isinstance(data, str):
        return _tokenize([data], tokenizer)
    if isinstance(data, Sequence):
        if all(isinstance(x, str) for x in data):
            return _tokenize(list(data), tokenizer)
        if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in data):
            return torch.tensor(list(data), dtype=torch.int64)
        raise ValueError("data: a list must hold only strings or only token ids")
    raise TypeError(f"data: expected a path, text, a list of texts or token ids, got {type(data).__name__}")


def _read_lines(path: Path) -> list[str]:
    # newline="\n": split on "\n" only and keep it, so lines are the rows that were joined
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            return list(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"data: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from err


def _tokenize(texts: list[str], tokenizer) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("data: text needs a tokenizer; pass token ids instead")
    pieces = []
    for i in range(0, len(texts), _LINES_PER_CALL):
        # verbose=False: a long text is expected here, not a too-long model input
        enc = tokenizer(texts[i : i + _LINES_PER_CALL], add_special_tokens=False, verbose=False)["input_ids"]
        pieces.extend(torch.tensor(ids, dtype=torch.int64) for ids in enc)
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
