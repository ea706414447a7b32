"""Finding and reading checkpoint files from a local directory or a hub name.

Every failure is a clear exception naming the file: FileNotFoundError when a
file is missing, ValueError when it exists but cannot be read.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
from urllib.parse import urlparse

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve(name_or_path: str | os.PathLike, filename: str) -> str | None:
    """Local path of `filename` in a checkpoint directory or hub repo, or None when it has none.

    A local directory is used as is; any other name goes through the Hugging Face
    cache (and the hub, when it can be reached).
    """
    root = os.fspath(name_or_path)
    if os.path.isdir(root):
        path = os.path.join(root, filename)
        return path if os.path.isfile(path) else None
    if os.path.exists(root):
        raise FileNotFoundError(f"{root}: expected a checkpoint directory, found a file")
    if os.path.isabs(root) or root.startswith((".", "~")) or root.count("/") > 1 or os.sep != "/" and os.sep in root:
        raise FileNotFoundError(f"{root}: no such directory (and not a hub name)")
    from transformers.utils import cached_file

    try:
        if not _hub_reachable():  # fail in seconds, not after minutes of retries
            found = cached_file(root, filename, _raise_exceptions_for_missing_entries=False, local_files_only=True)
            if found is None and cached_file(root, "config.json", _raise_exceptions_for_missing_entries=False,
                                             local_files_only=True) is None:
                raise FileNotFoundError(
                    f"{root}: not a local directory, not in the Hugging Face cache, and the hub cannot be reached "
                    "(offline): download it on a machine with network access, or pass a local directory")
            return found
        return cached_file(root, filename, _raise_exceptions_for_missing_entries=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # hub errors come in many types; all mean "cannot get it"
        raise FileNotFoundError(f"{root}: not a local directory, and the hub could not provide {filename} ({err})") from err


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_config(name_or_path: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint."""
    path = resolve(name_or_path, "config.json")
    if path is None:
        raise FileNotFoundError(f"{os.fspath(name_or_path)}: no config.json")
    return read_json(path)


def read_json(path: str | os.PathLike, recover: str | None = None) -> dict:
    """A JSON object from `path`, or ValueError naming the file (and saying how to recover, when given)."""
    then = "" if recover is None else f"; {recover}"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{os.fspath(path)} is empty or corrupt JSON ({type(err).__name__}: {err}){then}") from err
    if isinstance(data, dict):
        return data
    raise ValueError(f"{os.fspath(path)} is corrupt (a JSON {type(data).__name__}, expected an object){then}")


def weight_files(name_or_path: str | os.PathLike) -> list[str]:
    """Local paths of a checkpoint's weight files (one, or every shard listed by an index)."""
    for name in WEIGHT_FILES:
        path = resolve(name_or_path, name)
        if path is None:
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = sorted(set(read_json(path).get("weight_map", {}).values()))
        files = [resolve(name_or_path, s) for s in shards]
        missing = [s for s, f in zip(shards, files) if f is None]
        if missing or not shards:
            raise FileNotFoundError(f"{path}: shards missing: {missing or 'none listed'}")
        return files
    raise FileNotFoundError(f"{os.fspath(name_or_path)}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def load_state_dict(files: list[str]) -> dict[str, torch.Tensor]:
    """All tensors of the given weight files, on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                out.update(load_file(path))
            else:
                out.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # safetensors and pickle raise various types on bad bytes
            raise ValueError(f"{path}: corrupt checkpoint ({type(err).__name__}: {err})") from err
    return out


def weight_names(files: list[str]) -> set[str]:
    """The tensor names in the given weight files, reading only headers where possible."""
    names: set[str] = set()
    for path in files:
        if not path.endswith(".safetensors"):
            names |= set(load_state_dict([path]))
            continue
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                names |= set(f.keys())
        except Exception as err:
            raise ValueError(f"{path}: corrupt checkpoint ({type(err).__name__}: {err})") from err
    return names


def weight_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the given weight files, from safetensors headers where possible."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if not path.endswith(".safetensors"):
            shapes |= {k: tuple(v.shape) for k, v in load_state_dict([path]).items()}
            continue
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        except Exception as err:
            raise ValueError(f"{path}: corrupt checkpoint ({type(err).__name__}: {err})") from err
    return shapes


_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:h|layers|blocks|layer)\.(\d+)\.")
_LAYER_KEYS = ("n_layer", "num_hidden_layers", "num_layers")
_WIDTH_KEYS = ("n_embd", "hidden_size", "d_model")
_EMBEDDINGS = ("wte.weight", "embed_tokens.weight", "word_embeddings.weight", "embed_in.weight")


def check_config_against_weights(name_or_path: str | os.PathLike, config: dict | None = None) -> None:
    """Refuse a config.json whose sizes disagree with its weights, before any model is built.

    Compares the number of blocks and the hidden size in config.json with the
    tensors' names and shapes (headers only for safetensors), so that a hostile or
    mismatched config (a billion layers, another architecture's defaults) costs
    nothing. Raises ValueError naming the checkpoint.
    """
    where = os.fspath(name_or_path)
    config = load_config(name_or_path) if config is None else config
    shapes = weight_shapes(weight_files(name_or_path))
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_INDEX.search(k))}
    for key in (k for k in _LAYER_KEYS if isinstance(config.get(k), int)):  # every one given must hold
        n = config[key]
        if not blocks and n > 0:
            raise ValueError(f"{where}: config.json says {key}={n}, but no tensor in its weights belongs to a block; "
                             "the weights do not match the config")
        if blocks and n != max(blocks) + 1:
            raise ValueError(f"{where}: config.json says {key}={n}, but the weights hold {max(blocks) + 1} blocks")
    width_key = next((k for k in _WIDTH_KEYS if isinstance(config.get(k), int)), None)
    heads_key = next((k for k in ("n_head", "num_attention_heads") if isinstance(config.get(k), int)), None)
    has_attention = any("attn" in k or "attention" in k for k in shapes)  # an MLP Memory's n_head means nothing
    if has_attention and width_key is not None and heads_key is not None and (
            config[heads_key] < 1 or config[width_key] % config[heads_key]):
        raise ValueError(f"{where}: config.json's {heads_key}={config[heads_key]} does not divide "
                         f"{width_key}={config[width_key]}")
    embedding = next((v for k, v in shapes.items() if k.endswith(_EMBEDDINGS) and len(v) == 2), None)
    if width_key is not None and embedding is not None and embedding[1] != config[width_key]:
        raise ValueError(f"{where}: config.json says {width_key}={config[width_key]}, but the token embedding has "
                         f"width {embedding[1]}")


def take(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> dict[str, torch.Tensor]:
    """The tensors named in `expected`, checked for presence and shape."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{where}: checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{where}: {k} has shape {list(state[k].shape)}, expected {list(shape)}")
    return {k: state[k] for k in expected}


MIXING_FILE = "memdec_config.json"
DEFAULT_MIXING = {"lmbda": 0.55, "knn_temp": 1.0}


def read_mixing(memory: str | os.PathLike) -> dict:
    """lmbda and knn_temp stored beside a local memory checkpoint, else upstream's defaults.

    memdec_fast.train writes the values it tuned to ``memdec_config.json`` in the
    memory's directory; a memory without one (or a hub name) gets lmbda 0.55,
    knn_temp 1.0. A file that is not a JSON object of numbers in range raises
    ValueError naming the file.
    """
    path = os.path.join(os.fspath(memory), MIXING_FILE)
    if not os.path.isfile(path):
        return dict(DEFAULT_MIXING)
    stored = read_json(path)
    out = dict(DEFAULT_MIXING)
    for key, ok, rule in (("lmbda", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"), ("knn_temp", lambda v: v > 0, "> 0")):
        if key not in stored:
            continue
        v = stored[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ValueError(f"{path}: {key} must be a number {rule}, got {v!r}")
        out[key] = float(v)
    return out


def mixing_defaults(memory, lmbda: float | None, knn_temp: float | None) -> tuple[float, float]:
    """(lmbda, knn_temp): the values given, else those stored with the memory (:func:`read_mixing`).

    `memory` may be a path, a hub name, or a loaded model (which stores nothing: upstream's defaults).
    """
    if lmbda is not None and knn_temp is not None:
        return lmbda, knn_temp
    stored = read_mixing(memory) if isinstance(memory, (str, os.PathLike)) else dict(DEFAULT_MIXING)
    return (stored["lmbda"] if lmbda is None else lmbda), (stored["knn_temp"] if knn_temp is None else knn_temp)
