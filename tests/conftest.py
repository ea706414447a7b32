"""Shared fixtures: tiny random checkpoints (built by tests/tiny_models.py) saved to disk.

tests/vllm/ needs vLLM's CPU build, which lives in an environment of its own (tests/vllm/run.sh); other
environments skip that folder.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
from tiny_models import EOS, PAD_ROWS, build_tokenizer, save_gpt2, save_mlp_memory

__all__ = ["EOS", "PAD_ROWS", "build_tokenizer", "require_test_extras", "save_gpt2", "save_mlp_memory"]

def require_test_extras(*modules: str) -> None:
    """Fail the calling test file, at collection, when a declared test extra is missing.

    The test extras are part of the test environment (pyproject.toml's ``test`` extra; tests/run.sh installs
    them): without one the environment is broken, and a quiet skip would hide that. Skips are kept for what a
    machine cannot have, such as a GPU or vLLM.
    """
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        pytest.fail(f"missing test extras {', '.join(missing)}: install the package with its test extras "
                    "(pip install -e '.[test]', or bash tests/run.sh, which installs them)", pytrace=False)


_vllm = importlib.util.find_spec("vllm")
collect_ignore = [] if _vllm is not None and _vllm.origin is not None else ["vllm"]  # tests/vllm is no package


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tokenizer):
    """Paths of the tiny checkpoints: base, decoder memory, two MLP memories."""
    root = tmp_path_factory.mktemp("ckpts")
    vocab = len(tokenizer) + PAD_ROWS
    return {
        "base": save_gpt2(root / "base", tokenizer, seed=0),
        # a different shape than the base, and a ReLU, to catch config plumbing
        "decoder": save_gpt2(root / "decoder", tokenizer, seed=1, n_embd=48, n_head=3, n_layer=3,
                             activation_function="relu"),
        # reads h[0]'s MLP input through an embedding_transform (32 -> 48)
        "mlp": save_mlp_memory(root / "mlp", vocab, seed=2, n_embd=48, input_dim=32, layer_position=0),
        # no config file: layer_position -1, and the same hidden size as the base
        "mlp_last": save_mlp_memory(root / "mlp_last", vocab, seed=3, n_embd=32, input_dim=None, layer_position=None),
    }
