"""Files the training pipeline writes: atomic JSON, and output directories that hold only our own files.

A crash (or a kill) at any point leaves either the old or the new version of a
JSON file, never a half-written one; and the trainers never delete a file they
did not write.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["check_output_dir", "remove_own", "write_json_atomic"]


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write `obj` as JSON to `path` through a temporary file, fsync'd, then os.replace (and fsync the directory)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# What save_pretrained (model, config, tokenizer) and the trainers write into a memory's directory.
HF_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "memdec_config.json", "memdec_config.json.tmp",
    "mlp_memory_config.json",
})
_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def _unrecognised(out: Path, checkpoint_files: Iterable[str]) -> list[str]:
    ours = set(checkpoint_files)
    found = []
    for entry in sorted(out.iterdir()):
        if entry.name == "checkpoint" and entry.is_dir():
            found += [f"checkpoint/{e.name}" for e in sorted(entry.iterdir()) if e.name not in ours]
        elif entry.name not in HF_FILES and not _SHARD.fullmatch(entry.name):
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def check_output_dir(out: Path, checkpoint_files: Iterable[str], overwrite: bool) -> None:
    """Refuse an output directory holding files a trainer does not write, unless `overwrite`.

    Parameters
    ----------
    out : path
        The memory's directory (it may not exist yet).
    checkpoint_files : names
        What the trainer writes under ``out/checkpoint/`` (its resumable state).
    overwrite : bool
        Go ahead anyway; the unrecognised files are kept, never deleted.
    """
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    strange = _unrecognised(out, checkpoint_files)
    if strange:
        shown = ", ".join(strange[:5]) + (f" and {len(strange) - 5} more" if len(strange) > 5 else "")
        raise ValueError(f"--out {out} holds files the trainer did not write ({shown}); choose an empty directory, "
                         "or pass --overwrite to write there anyway (those files are kept)")


def remove_own(checkpoint_dir: Path, names: Iterable[str]) -> None:
    """Delete the trainer's own files from `checkpoint_dir`, then the directory if nothing else is left."""
    for name in names:
        (checkpoint_dir / name).unlink(missing_ok=True)
    try:
        checkpoint_dir.rmdir()
    except OSError:  # missing, or holding someone else's files: both fine
        pass
