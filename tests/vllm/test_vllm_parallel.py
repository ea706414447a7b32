"""Tensor parallelism over 2 ranks (two CPU worker processes): the sharded base, Memory Decoder and MLP Memory
(column- and row-parallel MLPs, a vocabulary-parallel head gathered to one rank) give JointGenerator's tokens."""

from __future__ import annotations

import pytest
from plugin_setup import LMBDA, engine_args
from vllm import LLM, SamplingParams

from memdec_fast import JointGenerator

PROMPTS = ["the quick brown fox", "a", "memory decoders give a base model domain"]


@pytest.mark.parametrize("memory", ["decoder2", "mlp"])
def test_two_tensor_parallel_ranks_give_joint_generator_tokens(memory, pairs, monkeypatch):
    # vLLM binds each CPU worker to cores of its own; one core per rank on a 2-core machine
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    want = JointGenerator.from_pretrained(pairs["base"], pairs[memory], lmbda=LMBDA, device="cpu").generate(
        PROMPTS, max_new_tokens=12)
    llm = LLM(**engine_args(pairs["base"], pairs[memory], tensor_parallel_size=2))
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False))
    finally:
        llm.llm_engine.engine_core.shutdown()
    for row, (mine, out) in enumerate(zip(want.token_ids, outs)):
        assert list(out.outputs[0].token_ids)[: len(mine)] == mine, f"prompt {row} ({PROMPTS[row]!r})"
