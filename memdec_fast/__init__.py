"""memdec_fast: low-latency inference for language models with a pretrained memory.

A memory (a Memory Decoder, or an MLP Memory) gives a base causal LM domain
knowledge without touching its weights; at each step the two next-token
distributions are mixed::

    p = (1 - lmbda) * softmax(base_logits / base_temp) + lmbda * softmax(mem_logits / knn_temp)

Entry points: :class:`JointGenerator` (generation), :class:`Engine` (serving many
requests at once), :func:`perplexity`
(evaluation), :mod:`memdec_fast.ops` (the fused kernels) and
:mod:`memdec_fast.train` (building a memory for your own corpus).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Nothing heavy loads at import: `memdec-fast --help` must not wait for torch.
_SUBMODULES = {"ops": "memdec_fast.ops", "reference": "memdec_fast.ops.reference"}

# Exported name -> the module that defines it. No exported name may also be a
# submodule's name: importing a submodule binds it on the package, and would then
# shadow the lazy attribute of the same name for good (tests/test_package.py checks).
_LAZY = {
    "build_info": "memdec_fast.ops.build_info",
    "Engine": "memdec_fast.engine",
    "JointGenerator": "memdec_fast.generation.generator",
    "GenerationResult": "memdec_fast.generation.outputs",
    "perplexity": "memdec_fast.eval.perplexity",
    "PerplexityResult": "memdec_fast.eval.perplexity",
}

__all__ = [
    "Engine", "GenerationResult", "JointGenerator", "PerplexityResult", "__version__", "build_info", "ops", "perplexity",
    "reference",
]


def __getattr__(name: str):
    # Heavy modules (torch, models, transformers) load on first use, not at import.
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'memdec_fast' has no attribute {name!r}")
