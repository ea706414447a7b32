"""memdec_fast: low-latency inference for language models with a pretrained memory.

A memory (a Memory Decoder, or an MLP Memory) gives a base causal LM domain
knowledge without touching its weights; at each step the two next-token
distributions are mixed::

    p = (1 - lmbda) * softmax(base_logits / base_temp) + lmbda * softmax(mem_logits / knn_temp)

Entry points: :class:`JointGenerator` (generation), :func:`perplexity`
(evaluation), :mod:`memdec_fast.ops` (the fused kernels) and
:mod:`memdec_fast.train` (building a memory for your own corpus).
"""

from __future__ import annotations

import importlib

from memdec_fast import ops, reference
from memdec_fast.build import build_info

__version__ = "0.1.0"

_LAZY = {
    "JointGenerator": "memdec_fast.generator",
    "GenerationResult": "memdec_fast.generator",
    "perplexity": "memdec_fast.perplexity",
    "PerplexityResult": "memdec_fast.perplexity",
}

__all__ = [
    "GenerationResult", "JointGenerator", "PerplexityResult", "__version__", "build_info", "ops", "perplexity",
    "reference",
]


def __getattr__(name: str):
    # Heavy modules (models, transformers) load on first use, not at import.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memdec_fast' has no attribute {name!r}")
