"""Fixtures for the vLLM plugin's tests, which run on vLLM's CPU build in their own environment (tests/vllm/run.sh).

One vLLM engine per memory type starts on first use and is shared by the session.
"""

from __future__ import annotations

import os

import pytest
from plugin_setup import LMBDA, SERVED, engine_args, save_pairs

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine; the default takes 4
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pairs(tmp_path_factory, tokenizer):
    """Paths of the tiny bases and memories; see plugin_setup.save_pairs."""
    return save_pairs(tmp_path_factory.mktemp("vllm_pairs"), tokenizer)


def built_once(pairs: dict, make):
    """get(kind) -> make(base path, memory path) for plugin_setup.SERVED[kind], made on first use; and what was made."""
    built = {}

    def get(kind: str):
        if kind not in built:
            built[kind] = make(*(pairs[name] for name in SERVED[kind]))
        return built[kind]

    return get, built


@pytest.fixture(scope="session")
def engines(pairs):
    """engines(kind) -> a vllm.LLM serving plugin_setup.SERVED[kind] (float32, eager, lambda LMBDA)."""
    from vllm import LLM

    get, built = built_once(pairs, lambda base, memory: LLM(**engine_args(base, memory)))
    yield get
    for llm in built.values():
        llm.llm_engine.engine_core.shutdown()  # each engine holds a process and its KV cache


@pytest.fixture(scope="session")
def generators(pairs):
    """generators(kind) -> memdec_fast.JointGenerator of SERVED[kind] on the CPU, float32, lambda LMBDA."""
    from memdec_fast import JointGenerator

    return built_once(pairs, lambda base, memory: JointGenerator.from_pretrained(base, memory, lmbda=LMBDA,
                                                                                  device="cpu"))[0]
