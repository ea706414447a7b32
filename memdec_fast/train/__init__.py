"""Build a memory for your own corpus: datastore, kNN targets, Memory Decoder and MLP Memory training.

The pipeline (upstream's, at any scale)::

    ds = build_datastore("base/", "corpus.txt", "ds/")        # keys: base hidden states; values: next tokens
    build_knn_targets(ds, k=1024, temperature=16)              # sparse p_kNN per key
    train_memory_decoder(ds, "small_lm/", "memory/", TrainConfig(epochs=3))
    train_mlp_memory(ds, "mlp_memory/", base="base/")          # upstream MLP Memory format

and :class:`KNNLM`, the kNN-LM baseline on the same datastore. Everything is
also on the command line: ``memdec-fast train --help``.
"""

import importlib

# name -> defining module; loaded on first use so that `memdec-fast --help` never imports torch or faiss
_LAZY = {
    "Datastore": "datastore", "build_datastore": "datastore", "train_memory_decoder": "decoder", "KNNLM": "knnlm",
    "TrainConfig": "loop", "memory_loss": "loss", "MLPMemory": "mlp_memory", "load_mlp_memory": "mlp_memory",
    "save_mlp_memory": "mlp_memory", "train_mlp_memory": "mlp_memory", "KnnTargets": "targets",
    "build_knn_targets": "targets", "knn_distribution": "targets",
}

__all__ = [
    "KNNLM",
    "Datastore",
    "KnnTargets",
    "MLPMemory",
    "TrainConfig",
    "build_datastore",
    "build_knn_targets",
    "knn_distribution",
    "load_mlp_memory",
    "memory_loss",
    "save_mlp_memory",
    "train_memory_decoder",
    "train_mlp_memory",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"memdec_fast.train.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memdec_fast.train' has no attribute {name!r}")
