"""Refusing model pairs that cannot be mixed: memory types, vocabularies, tokenizers, hidden sizes."""

from __future__ import annotations

import os
import re

from memdec_fast.models import checkpoint, detect_memory_type

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")
MEMORY_TYPES = ("auto", "decoder", "mlp")


def check_memory_type(memory_type: str, key: str = "memory_type") -> None:
    """memory_type must be one of MEMORY_TYPES; `key` names the setting in the message."""
    if memory_type not in MEMORY_TYPES:
        raise ValueError(f"{key}: unknown memory type {memory_type!r}; expected one of {MEMORY_TYPES}")


def resolve_memory_type(memory: str | os.PathLike, memory_type: str, key: str = "memory_type") -> str:
    """"decoder" or "mlp": the type asked for, when the memory's weights do not say otherwise, or the one detected
    for "auto" (see :func:`memdec_fast.models.detect_memory_type`). `key` names the setting in messages."""
    check_memory_type(memory_type, key)
    by_weights = detect_memory_type(memory, by_weights=True)
    if memory_type != "auto" and by_weights is not None and by_weights != memory_type:
        kinds = {"mlp": "an MLP Memory (MLP blocks, no attention)", "decoder": "a Memory Decoder (a causal LM)"}
        raise ValueError(f"{key}: {memory_type!r}, but {os.fspath(memory)} looks like {kinds[by_weights]}; "
                         f"set {key} to {by_weights!r} or 'auto'")
    return detect_memory_type(memory) if memory_type == "auto" else memory_type


def check_covers_tokenizer(vocab: int, rows: dict[str, int]) -> None:
    """Each model's output rows (who -> rows) must cover the tokenizer's `vocab` tokens."""
    for who, n in rows.items():
        if n < vocab:
            raise ValueError(f"vocabulary mismatch: the {who} model has {n} output rows, but the tokenizer has {vocab} "
                             "tokens")


def check_vocab(vocab: int, base_rows: int, memory_rows: int, memory_kind: str) -> None:
    """Both models must cover the tokenizer, and (padding aside) have the same output size.

    Mixing happens over the tokenizer's len(tokenizer) tokens; rows beyond it
    are padding. Different output sizes mean different vocabularies.
    """
    check_covers_tokenizer(vocab, {"base": base_rows, memory_kind: memory_rows})
    if base_rows != memory_rows:
        raise ValueError(
            f"vocabulary mismatch: the base has {base_rows} output rows and the {memory_kind} {memory_rows}; "
            "a memory must be trained on the base's tokenizer and vocabulary"
        )


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with a checkpoint, or ValueError when it has none that loads."""
    from transformers import AutoTokenizer

    if not any(checkpoint.resolve(path, f) for f in TOKENIZER_FILES):
        raise ValueError(f"{os.fspath(path)}: no usable tokenizer (no tokenizer files); pass tokenizer=...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # missing or bad files raise many types
        raise ValueError(f"{os.fspath(path)}: no usable tokenizer ({err}); pass tokenizer=...") from err
    if len(tokenizer) < 2:
        raise ValueError(f"{os.fspath(path)}: no usable tokenizer (it has {len(tokenizer)} tokens)")
    return tokenizer


def check_tokenizers(tokenizer, memory: str | os.PathLike) -> None:
    """When the memory ships a tokenizer, it must equal the base's (same tokens, same ids)."""
    if not any(checkpoint.resolve(memory, f) for f in TOKENIZER_FILES):
        return
    ours, theirs = tokenizer.get_vocab(), load_tokenizer(memory).get_vocab()
    if theirs != ours:
        token = min(set(ours) ^ set(theirs) or {t for t in ours if ours[t] != theirs[t]},
                    key=lambda t: (ours.get(t, len(ours)), t))
        where = {name: f"id {v[token]}" if token in v else "absent" for name, v in (("base", ours), ("memory", theirs))}
        raise ValueError(
            f"tokenizer mismatch: the memory at {os.fspath(memory)} uses a different tokenizer than the base "
            f"({len(theirs)} and {len(ours)} tokens): token {token!r} is {where['base']} in the base and "
            f"{where['memory']} in the memory"
        )


def check_layer_position(layer_position: int, num_layers: int) -> None:
    if not -num_layers <= layer_position < num_layers:
        raise ValueError(f"MLP Memory: layer_position {layer_position} is outside the base's {num_layers} blocks")


def check_hidden_size(input_dim: int, hidden_size: int) -> None:
    if input_dim != hidden_size:
        raise ValueError(
            f"MLP Memory: it reads hidden states of size {input_dim}, but the base's hidden size is {hidden_size}"
        )


MEMORY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A memory's name: it becomes part of a URL-safe model id ("<served>:<name>"), so letters, digits, '_', '.', '-'."""


def check_memory_names(names: list[str]) -> None:
    """At least one name; memory names must be unique, URL-safe (:data:`MEMORY_NAME`) and not "base"; the message
    names the memory."""
    if not names:
        raise ValueError("memories: expected at least one memory")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not MEMORY_NAME.fullmatch(name):
            raise ValueError(f"memory {name!r}: a memory name takes 1-64 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit")
        if name == "base":
            raise ValueError("memory 'base': the name is reserved for the base alone (the server's metrics label)")
        if name in seen:
            raise ValueError(f"memory {name!r}: the name is given twice; memory names must be unique")
        seen.add(name)
