"""Disjoint windows (stride == block_size), Hugging Face's no-overlap perplexity recipe, against a float64 loop."""

from __future__ import annotations

import math

import pytest
import torch

from memdec_fast import perplexity
from memdec_fast.eval.perplexity import plan_windows


def float64_disjoint_ppl(base, memory, ids: list[int], block: int, lmbda: float, knn_temp: float, vocab: int) -> dict:
    """Each window [w*block, (w+1)*block) alone, in float64 transformers models; its tokens after the first scored.
    The softmaxes cover the tokenizer's `vocab` tokens, not the models' padding rows."""
    nll = {"base": 0.0, "memory": 0.0, "joint": 0.0}
    count = 0
    for start in range(0, len(ids), block):
        window = torch.tensor([ids[start : start + block]])  # [1, T]
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            lb = torch.log_softmax(base(window).logits[0, :-1, :vocab], -1)  # [T - 1, V]
            lm = torch.log_softmax(memory(window).logits[0, :-1, :vocab] / knn_temp, -1)
        target = window[0, 1:, None]
        pb, pm = lb.gather(1, target)[:, 0], lm.gather(1, target)[:, 0]
        pj = torch.logaddexp(pb + math.log1p(-lmbda), pm + math.log(lmbda))
        nll["base"] -= pb.sum().item()
        nll["memory"] -= pm.sum().item()
        nll["joint"] -= pj.sum().item()
        count += window.shape[1] - 1
    return {k: math.exp(v / count) for k, v in nll.items()} | {"tokens": count}


def test_plan_of_disjoint_windows_skips_each_windows_first_token():
    spans = plan_windows(10, 4, 4)
    assert [(s.begin, s.end, s.first) for s in spans] == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    s = plan_windows(2000, 1024, 512)[2]  # overlapping windows: unchanged
    assert (s.begin, s.end, s.first) == (512, 1536, 1024)


@pytest.mark.parametrize("block", [16, 13])
def test_disjoint_windows_equal_a_float64_loop(ckpts, tokenizer, block):
    from transformers import GPT2LMHeadModel

    text = "héllo wörld, the quick brown fox jumps over the lazy dog; memory decoders give a base model " * 3
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) % block != 0  # a short last window too
    res = perplexity(ckpts["base"], ckpts["decoder"], ids, lmbda=0.3, knn_temp=0.7, block_size=block,
                     stride=block, dtype=torch.float32)
    base = GPT2LMHeadModel.from_pretrained(ckpts["base"]).double().eval()
    memory = GPT2LMHeadModel.from_pretrained(ckpts["decoder"]).double().eval()
    want = float64_disjoint_ppl(base, memory, ids, block, 0.3, 0.7, len(tokenizer))
    assert res.tokens == want["tokens"] == len(ids) - math.ceil(len(ids) / block)
    for got, key in ((res.base_ppl, "base"), (res.memory_ppl, "memory"), (res.joint_ppl[0.3], "joint")):
        assert got == pytest.approx(want[key], rel=1e-5), key
