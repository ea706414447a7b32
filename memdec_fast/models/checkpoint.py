"""Finding and reading checkpoint files from a local directory or a hub name.

Every failure is a clear exception naming the file: FileNotFoundError when a
file is missing, ValueError when it exists but cannot be read.
"""

from __future__ import annotations

import json
import os

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
    from transformers.utils import cached_file

    try:
        return cached_file(root, filename, _raise_exceptions_for_missing_entries=False)
    except Exception as err:  # hub errors come in many types; all mean "cannot get it"
        raise FileNotFoundError(f"{root}: not a local directory, and the hub could not provide {filename} ({err})") from err


def load_config(name_or_path: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint."""
    path = resolve(name_or_path, "config.json")
    if path is None:
        raise FileNotFoundError(f"{os.fspath(name_or_path)}: no config.json")
    return read_json(path)


def read_json(path: str) -> dict:
    """A JSON object from `path`, or ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: corrupt JSON ({err})") from err
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path}: corrupt JSON (expected an object)")


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


def read_mixing(memory_dir: str | os.PathLike) -> dict:
    """lmbda and knn_temp stored beside a local memory checkpoint, else upstream's defaults.

    memdec_fast.train writes the values it tuned to ``memdec_config.json`` in the
    memory's directory; a memory without one (or a hub name) gets lmbda 0.55,
    knn_temp 1.0.
    """
    path = os.path.join(os.fspath(memory_dir), MIXING_FILE)
    if not os.path.isfile(path):
        return dict(DEFAULT_MIXING)
    with open(path, encoding="utf-8") as f:
        return DEFAULT_MIXING | json.load(f)
