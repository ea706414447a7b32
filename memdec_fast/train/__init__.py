"""Build a memory for your own corpus: datastore, kNN targets, Memory Decoder and MLP Memory training.

The pipeline (upstream's, at any scale)::

    ds = build_datastore("base/", "corpus.txt", "ds/")        # keys: base hidden states; values: next tokens
    build_knn_targets(ds, k=1024, temperature=16)              # sparse p_kNN per key
    train_memory_decoder(ds, "small_lm/", "memory/", TrainConfig(epochs=3))
    train_mlp_memory(ds, "mlp_memory/", base="base/")          # upstream MLP Memory format

and :class:`KNNLM`, the kNN-LM baseline on the same datastore. Everything is
also on the command line: ``memdec-fast train --help``.
"""

from memdec_fast.train.datastore import Datastore, build_datastore
from memdec_fast.train.decoder import train_memory_decoder
from memdec_fast.train.knnlm import KNNLM
from memdec_fast.train.loop import TrainConfig
from memdec_fast.train.loss import memory_loss
from memdec_fast.train.mlp_memory import MLPMemory, load_mlp_memory, save_mlp_memory, train_mlp_memory
from memdec_fast.train.targets import KnnTargets, build_knn_targets, knn_distribution

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
