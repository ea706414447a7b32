"""The mixture weights stored with a trained memory: ``memdec_config.json``, read by the runtime.

The file is what :func:`memdec_fast.models.checkpoint.read_mixing` reads::

    {"lmbda": 0.4, "knn_temp": 1.0, "tuned_on": "val.txt", "tune_ppl": 5.31}

lmbda and knn_temp are the numbers the runtime uses; the other keys say where
they came from (``tuned_on`` is null when no text was given to tune on).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from memdec_fast import ranges
from memdec_fast.models.checkpoint import DEFAULT_MIXING, MIXING_FILE
from memdec_fast.train.datastore import Datastore
from memdec_fast.train.evaluate import LMBDA_GRID, as_lines
from memdec_fast.train.files import write_json_atomic

__all__ = ["check_knn_temps", "datastore_base", "finish_memory", "tune_mixing", "write_mixing"]


def check_knn_temps(knn_temps: Sequence[float]) -> None:
    """The temperatures to tune with must be ones the mixing ops take; checked before training, not after it."""
    if not knn_temps:
        raise ValueError("knn_temp: give at least one temperature to try")
    for temp in knn_temps:
        ranges.check("train.knn_temp", temp, "knn_temp")


def tune_mixing(base: str | Path, memory: str | Path, texts: list[str], knn_temps: Sequence[float] = (1.0,),
                block_size: int = 128, stride: int = 64, memory_type: str = "auto",
                device: str = "cpu") -> dict:
    """The (lmbda, knn_temp) with the lowest joint perplexity on `texts`: lmbda over LMBDA_GRID, for each knn_temp.

    Parameters
    ----------
    base, memory : path
        The base LM and the trained memory (Memory Decoder or MLP Memory).
    texts : list[str]
        Validation documents, not the training corpus.
    knn_temps : floats
        Memory softmax temperatures to try (one perplexity pass each).
    block_size, stride : the perplexity windows (:func:`memdec_fast.eval.perplexity.perplexity`).

    Returns
    -------
    dict
        ``lmbda``, ``knn_temp``, ``tune_ppl`` (the joint perplexity there), ``base_ppl``, ``tune_tokens``.

    Example
    -------
    >>> tune_mixing("base/", "memory/", open("val.txt").read().splitlines())  # doctest: +SKIP
    {'lmbda': 0.4, 'knn_temp': 1.0, 'tune_ppl': 5.31, 'base_ppl': 9.8, 'tune_tokens': 20412}
    """
    from memdec_fast.eval.perplexity import perplexity

    if not texts:
        raise ValueError("no text to tune the mixture weight on")
    best: dict | None = None
    for temp in knn_temps:
        r = perplexity(str(base), str(memory), as_lines(texts), lmbda=LMBDA_GRID, knn_temp=float(temp),
                       block_size=block_size, stride=stride, memory_type=memory_type, device=device, progress=False)
        lmbda = min(LMBDA_GRID, key=r.joint_ppl.__getitem__)
        if best is None or r.joint_ppl[lmbda] < best["tune_ppl"]:
            best = {"lmbda": lmbda, "knn_temp": float(temp), "tune_ppl": r.joint_ppl[lmbda], "base_ppl": r.base_ppl,
                    "tune_tokens": r.tokens}
    assert best is not None
    return best


def write_mixing(memory_dir: str | Path, lmbda: float | None = None, knn_temp: float | None = None,
                 tuned_on: str | None = None, tune_ppl: float | None = None) -> Path:
    """Write ``memdec_config.json`` (atomically) into a memory's directory; None means upstream's default.

    Returns
    -------
    Path
        The file written.
    """
    lmbda = DEFAULT_MIXING["lmbda"] if lmbda is None else float(lmbda)
    knn_temp = DEFAULT_MIXING["knn_temp"] if knn_temp is None else float(knn_temp)
    if not 0 <= lmbda <= 1 or not knn_temp > 0:
        raise ValueError(f"need 0 <= lmbda <= 1 and knn_temp > 0; got {lmbda}, {knn_temp}")
    path = Path(memory_dir) / MIXING_FILE
    write_json_atomic(path, {"lmbda": lmbda, "knn_temp": knn_temp, "tuned_on": tuned_on, "tune_ppl": tune_ppl})
    return path


def datastore_base(ds: Datastore) -> str:
    """The base directory recorded in a datastore's meta.json (ValueError when it is not a local directory)."""
    name = (ds.meta.get("base") or {}).get("name")
    if not name or not (Path(name) / "config.json").is_file():
        raise ValueError(f"the datastore {ds.path} records no base directory to tune with ({name!r}); pass --base")
    return name


def finish_memory(out: Path, ds: Datastore, tune_texts: list[str] | None, base: str | Path | None,
                  knn_temps: Sequence[float], tuned_on: str | None, memory_type: str, device) -> None:
    """Write ``memdec_config.json``: lmbda and knn_temp tuned on `tune_texts`, else the defaults."""
    if not tune_texts:
        write_mixing(out)
        return
    best = tune_mixing(base if base is not None else datastore_base(ds), out, tune_texts, knn_temps,
                       block_size=ds.block_size, stride=max(1, ds.block_size // 2), memory_type=memory_type,
                       device=str(device))
    write_mixing(out, best["lmbda"], best["knn_temp"], tuned_on=tuned_on or f"{len(tune_texts)} documents",
                 tune_ppl=best["tune_ppl"])
