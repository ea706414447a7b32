"""mixed_scores, what MemDecForCausalLM hands vLLM's sampler, against a float64 mixture."""

from __future__ import annotations

import torch

import memdec_fast
from memdec_fast import ops
from memdec_fast.vllm.model import mixed_scores


def test_mixed_scores_align_vocabularies_and_keep_the_mixture():
    g = torch.Generator().manual_seed(0)
    rows, vocab, base_rows, mem_rows = 5, 37, 41, 44  # the base pads 4 rows beyond the tokenizer, the memory 7
    base = torch.randn(rows, base_rows, generator=g, dtype=torch.float64) * 3
    mem = torch.randn(rows, 2 * mem_rows, generator=g, dtype=torch.float64)[:, ::2] * 3  # strided rows
    lmbda, knn_temp = 0.3, 0.7

    out = mixed_scores(base.float(), mem.float(), vocab, lmbda, knn_temp)

    assert out.shape == (rows, base_rows) and out.dtype == torch.float32
    assert torch.isneginf(out[:, vocab:]).all(), "rows beyond the tokenizer must never be drawn"
    p = (1 - lmbda) * torch.softmax(base[:, :vocab], -1) + lmbda * torch.softmax(mem[:, :vocab] / knn_temp, -1)
    got = torch.log_softmax(out.double(), -1)[:, :vocab]
    print(f"max |log p error| {(got - p.log()).abs().max():.2e}")
    torch.testing.assert_close(got, p.log(), atol=2e-5, rtol=0)
    # the shift is logsumexp(base): with lambda 0 the scores are the base's own logits
    base_only = mixed_scores(base.float(), mem.float(), vocab, 0.0, knn_temp)[:, :vocab]
    torch.testing.assert_close(base_only.double(), base[:, :vocab], atol=1e-4, rtol=0)


def test_the_plugin_mixes_with_the_compiled_op():
    """This environment's memdec_fast is a build for its own torch, so the plugin runs the fused kernel, not the
    reference that ops falls back to."""
    info = memdec_fast.build_info()
    print(info)
    assert ops.compiled_available(), info
    assert info["torch_built"] == torch.__version__
