"""The fused ops against their float64 references in memdec_fast.reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from memdec_fast import build_info, ops, reference

# Only what needs the kernels skips without the extension: memdec_fast.reference is the fallback users get, and the
# ops' wrappers then run it, so everything else still runs.
compiled = pytest.mark.skipif(not ops.compiled_available(), reason="needs the compiled extension")

# The CUDA copies are always collected, so a CPU run shows how many tests a GPU adds (benchmarks/gpu_check.sh
# runs them).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="the CUDA copy: needs a GPU"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sample_inputs(rows: int, vocab: int, device: str, base_dtype=torch.float32, mem_dtype=torch.float32,
                  strided: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits [rows, vocab]; `strided` slices them out of a padded vocabulary."""
    g = torch.Generator().manual_seed(seed)
    pad = 7 if strided else 0
    base = (3 * torch.randn(rows, vocab + pad, generator=g)).to(device=device, dtype=base_dtype)
    mem = (2 * torch.randn(rows, vocab + pad, generator=g) + 1).to(device=device, dtype=mem_dtype)
    return base[:, :vocab], mem[:, :vocab]


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, torch_f32: torch.Tensor) -> None:
    """Error against float64 at most 2x PyTorch's own float32 error (plus 1e-6 for exact cases)."""
    err = (got.double() - want.double()).abs()
    torch_err = (torch_f32.double() - want.double()).abs()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    print(f"ours: max {err[finite].max():.3g} mean {err[finite].mean():.3g}; "
          f"torch float32: max {torch_err[finite].max():.3g}")
    assert err[finite].max() <= 2 * torch_err[finite].max() + 1e-6


def torch_float32_joint(base, mem, lmbda, knn_temp=1.0, base_temp=1.0) -> torch.Tensor:
    """The mixture as plain float32 PyTorch computes it (the upstream way)."""
    lm = lmbda[:, None] if isinstance(lmbda, torch.Tensor) else torch.tensor(lmbda)
    return torch.logaddexp(torch.log1p(-lm) + torch.log_softmax(base.float() / base_temp, -1),
                           torch.log(lm) + torch.log_softmax(mem.float() / knn_temp, -1))


def per_row(rows: int, lo: float, hi: float, device: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(rows, generator=g, dtype=torch.float64)).float().to(device)


# ---------------------------------------------------------------- joint / target


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base_dtype", DTYPES)
@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,strided", [(2, False), (37, True), (1001, False), (50257, True)])
def test_joint_logprobs_matches_reference(device, base_dtype, mem_dtype, vocab, strided):
    base, mem = sample_inputs(5, vocab, device, base_dtype, mem_dtype, strided)
    lmbda = per_row(5, 0.0, 1.0, device)
    got = ops.joint_logprobs(base, mem, lmbda, knn_temp=0.7, base_temp=1.3)
    want = reference.component_logprobs(base, mem, lmbda, knn_temp=0.7, base_temp=1.3)[0]
    assert got.dtype == torch.float32 and got.shape == (5, vocab)
    assert_close_to_reference(got, want, torch_float32_joint(base, mem, lmbda, 0.7, 1.3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lmbda", [0.0, 0.55, 1.0])
def test_joint_logprobs_edge_weights(device, lmbda):
    base, mem = sample_inputs(3, 101, device)
    got = ops.joint_logprobs(base, mem, lmbda, knn_temp=2.0)
    if lmbda == 0.0:
        torch.testing.assert_close(got, torch.log_softmax(base.double(), -1).float(), atol=2e-5, rtol=0)
    if lmbda == 1.0:
        torch.testing.assert_close(got, torch.log_softmax(mem.double() / 2, -1).float(), atol=2e-5, rtol=0)
    torch.testing.assert_close(got.double().exp().sum(-1), torch.ones(3, dtype=torch.float64, device=device),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_target_logprobs_matches_reference(device, dtype):
    base, mem = sample_inputs(64, 999, device, dtype, torch.float32, strided=True)
    targets = torch.randint(0, 999, (64,), generator=torch.Generator().manual_seed(3)).to(device)
    lmbda = per_row(64, 0.0, 1.0, device)
    got = ops.target_logprobs(base, mem, targets, lmbda, knn_temp=per_row(64, 0.5, 2.0, device), base_temp=0.9)
    want = reference.target_logprobs(base, mem, targets, lmbda, knn_temp=per_row(64, 0.5, 2.0, device),
                                     base_temp=0.9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-6)


def test_target_logprobs_lambda_sweep_identity():
    base, mem = sample_inputs(16, 257, "cpu")
    targets = torch.arange(16)
    _, lp_base, lp_mem = ops.target_logprobs(base, mem, targets, 0.5)
    for lmbda in (0.1, 0.9):
        joint = ops.target_logprobs(base, mem, targets, lmbda)[0]
        swept = torch.logaddexp(math.log(1 - lmbda) + lp_base, math.log(lmbda) + lp_mem)
        torch.testing.assert_close(joint, swept, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- extreme parameters

F32_MAX = torch.finfo(torch.float32).max


def extreme_inputs(case: str, device: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Valid inputs where logits / temp overflows float32 (or 1 / temp does), fresh each call."""
    base, mem = sample_inputs(6, 301, device, strided=True, seed=int(torch.randint(0, 2**31, ())))
    base, mem = base.clone(), mem.clone()
    if case == "tiny_knn_temp":  # 1 / knn_temp overflows: the memory is one-hot at its max
        return base, mem, {"lmbda": 0.5, "knn_temp": 1e-39}
    if case == "knn_temp_below_float32":  # rounds to 0 in float32: the limit temp -> 0
        return base, mem, {"lmbda": 0.3, "knn_temp": 1e-300, "base_temp": 1e-38}
    if case == "huge_logit":  # 3e38 / 0.5 overflows
        base[::2, 17] = 3e38
        return base, mem, {"lmbda": 0.5, "base_temp": 0.5}
    if case == "logits_spanning_float32":  # x - max overflows, (x - max) / temp does not
        base[:, ::3] = -3e38
        base[:, 5] = 3e38
        base[:, 7] = 2.9e38
        return base, mem, {"lmbda": 0.4, "base_temp": 1e38, "knn_temp": F32_MAX}
    assert case == "per_row"  # the same through the row_params table
    base[1, 3] = -3e38
    base[1, 4] = 3e38
    return base, mem, {"lmbda": per_row(6, 0.0, 1.0, device), "knn_temp": torch.tensor([1e-39, 1e-45, 1.0, 0.5, 1e38, 3e38],
                                                                                       device=device),
                       "base_temp": torch.tensor([0.5, 1e38, 1e-39, 1.0, 2.0, 0.1], device=device)}


EXTREME = ["tiny_knn_temp", "knn_temp_below_float32", "huge_logit", "logits_spanning_float32", "per_row"]


def assert_matches_float64(got: torch.Tensor, want: torch.Tensor) -> None:
    """got equals the float64 `want` rounded to float32: finite in the same places, and close there."""
    want32 = want.float().to(got.device)
    finite = torch.isfinite(want32)
    assert not torch.isnan(got).any(), "NaN where the float64 reference is a number"
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.equal(got[~finite], want32[~finite])
    if finite.any():
        print(f"max error {(got.double() - want.to(got.device))[finite].abs().max():.3g}")
    torch.testing.assert_close(got[finite].double(), want.to(got.device)[finite], atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", EXTREME)
def test_extreme_parameters_match_float64_reference(device, case):
    base, mem, params = extreme_inputs(case, device)
    joint, lp_base, lp_mem = reference.component_logprobs(base, mem, **params)
    assert_matches_float64(ops.joint_logprobs(base, mem, **params), joint)

    targets = torch.randint(0, base.shape[1], (base.shape[0],), device=device)
    targets[::2] = base.argmax(-1)[::2]  # the max itself, where the scaled logit is 0
    got = ops.target_logprobs(base, mem, targets, **params)
    for g, w in zip(got, (joint, lp_base, lp_mem)):
        assert_matches_float64(g, w.gather(1, targets[:, None]).squeeze(1))

    tokens, logprobs = ops.sample(base, mem, **params, temperature=0.0)
    assert torch.equal(joint.gather(1, tokens[:, None]).squeeze(1), joint.max(-1).values)
    assert_matches_float64(logprobs, joint.gather(1, tokens[:, None]).squeeze(1))
    gen = torch.Generator(device=device).manual_seed(0)
    tokens, logprobs = ops.sample(base, mem, **params, temperature=0.9, top_p=0.95, generator=gen)
    assert ((tokens >= 0) & (tokens < base.shape[1])).all()
    assert_matches_float64(logprobs, joint.gather(1, tokens[:, None]).squeeze(1))


def test_reference_tiny_temperature_is_the_limit():
    # temp -> 0 puts all of a model's mass on its max; 1e-310 must give that, not logits / temp = inf
    base, mem = sample_inputs(4, 50, "cpu")
    joint = reference.component_logprobs(base, mem, 0.25, knn_temp=1e-310)[0]
    one_hot = torch.full((4, 50), -math.inf, dtype=torch.float64).scatter(1, mem.argmax(-1, keepdim=True), 0.0)
    want = torch.logaddexp(math.log(0.75) + torch.log_softmax(base.double(), -1), math.log(0.25) + one_hot)
    torch.testing.assert_close(joint, want, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base_dtype", DTYPES)
def test_greedy_is_argmax_of_reference(device, base_dtype):
    base, mem = sample_inputs(33, 50257, device, base_dtype, torch.bfloat16, strided=True)
    tokens, logprobs = ops.sample(base, mem, per_row(33, 0.0, 1.0, device), temperature=0.0)
    joint = reference.component_logprobs(base, mem, per_row(33, 0.0, 1.0, device))[0]
    best = joint.max(-1).values
    chosen = joint.gather(1, tokens[:, None]).squeeze(1)
    # equal up to float32 rounding of near-ties; exact ties are tested below
    torch.testing.assert_close(chosen, best, atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs.double(), chosen, atol=2e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_takes_first_index_on_ties(device):
    base = torch.zeros(2, 64, device=device)
    base[:, [5, 9, 40]] = 4.0
    mem = base.clone()
    tokens, _ = ops.sample(base, mem, 0.3, temperature=0.0)
    assert tokens.tolist() == [5, 5]


@pytest.mark.parametrize("device", DEVICES)
def test_subnormal_temperature_is_greedy(device):
    # 1 / 1e-40 overflows float32: such rows must fall back to greedy, not break
    base, mem = sample_inputs(16, 500, device)
    tokens, _ = ops.sample(base, mem, 0.3, temperature=1e-40, top_p=0.9,
                           generator=torch.Generator(device=device).manual_seed(0))
    assert torch.equal(tokens, ops.sample(base, mem, 0.3, temperature=0.0)[0])


# ---------------------------------------------------------------- sampling statistics


FILTERS = [
    {"temperature": 1.0},
    {"temperature": 0.6, "top_k": 4},
    {"temperature": 1.3, "top_p": 0.7},
    {"temperature": 1.0, "min_p": 0.08},
    {"temperature": 0.8, "top_k": 9, "top_p": 0.9, "min_p": 0.02},
]


def mixture_logp(base: torch.Tensor, mem: torch.Tensor, lmbda: float, knn_temp: float = 1.0,
                 base_temp: float = 1.0) -> torch.Tensor:
    """log p of the mixture, float64 [B, V], straight from the formula (not through memdec_fast.reference)."""
    p_base = torch.softmax(base.double() / base_temp, -1)
    p_mem = torch.softmax(mem.double() / knn_temp, -1)
    return ((1 - lmbda) * p_base + lmbda * p_mem).log()


def hf_filtered_probs(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0) -> torch.Tensor:
    """The distribution HF samples from, float64 [B, V]: its own warpers on `logp` [B, V], in its order.

    The oracle of the reference and of the kernels: it shares no code with either.
    """
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    return torch.softmax(warpers(None, logp.double()), -1)


def exact_distribution(base, mem, lmbda, **filters) -> torch.Tensor:
    """The filtered mixture that sampling must follow, float64 [V] (row 0), by the formula and HF's warpers."""
    return hf_filtered_probs(mixture_logp(base[:1], mem[:1], lmbda), **filters)[0].cpu()


def fresh_seed() -> int:
    seed = int(torch.randint(0, 2**31, ()))
    print(f"seed {seed}")
    return seed


HF_FILTERS = FILTERS + [
    {"temperature": 0.7, "top_p": 0.3},
    {"top_p": 0.999},
    {"temperature": 1.6, "top_p": 0.95, "min_p": 0.05},
    {"temperature": 2.5, "top_k": 1},
    {"top_k": 1003},
]


@pytest.mark.parametrize("filters", HF_FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_reference_filters_equal_hf_warpers(filters):
    # fresh float64 log-probs: a tie or a top-p boundary within rounding of the cut has probability ~1e-13 per row
    g = torch.Generator().manual_seed(fresh_seed())
    logp = torch.log_softmax(3 * torch.randn(17, 1003, generator=g, dtype=torch.float64), -1)
    got = torch.softmax(reference.filtered_logits(logp, **filters), -1)
    want = hf_filtered_probs(logp, **filters)
    assert torch.equal(got > 0, want > 0), f"kept {(got > 0).sum(-1).tolist()}, HF keeps {(want > 0).sum(-1).tolist()}"
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


def test_reference_per_row_filters_equal_hf_row_by_row():
    rows = [{"temperature": 0.5, "top_p": 0.6}, {"temperature": 1.0, "top_k": 7}, {"temperature": 1.7, "min_p": 0.2},
            {"temperature": 0.9, "top_k": 40, "top_p": 0.8, "min_p": 0.01}, {"temperature": 1.0}]
    g = torch.Generator().manual_seed(fresh_seed())
    logp = torch.log_softmax(2 * torch.randn(len(rows), 301, generator=g, dtype=torch.float64), -1)
    cols = {k: torch.tensor([float(r.get(k, d)) for r in rows], dtype=torch.float64)
            for k, d in (("temperature", 1.0), ("top_p", 1.0), ("min_p", 0.0))}
    cols["top_k"] = torch.tensor([r.get("top_k", 0) for r in rows])
    got = torch.softmax(reference.filtered_logits(logp, **cols), -1)
    for i, r in enumerate(rows):
        want = hf_filtered_probs(logp[i : i + 1], **r)[0]
        assert torch.equal(got[i] > 0, want > 0), r
        torch.testing.assert_close(got[i], want, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_sampling_follows_exact_distribution(device, impl, filters):
    vocab, draws = 23, 40000
    base, mem = sample_inputs(1, vocab, device, seed=11)
    base, mem = base.expand(draws, vocab), mem.expand(draws, vocab)  # rows draw independently
    gen = torch.Generator(device=device).manual_seed(1234)
    tokens, logprobs = impl.sample(base, mem, 0.4, generator=gen, **filters)
    probs = exact_distribution(base, mem, 0.4, **filters)
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    stat, pvalue = chisquare(counts[kept].numpy(), (probs[kept] * draws).numpy())
    print(f"kept {int(kept.sum())}/{vocab}, chi2 {stat:.1f}, p {pvalue:.3g}")
    assert pvalue > 1e-5
    joint = mixture_logp(base[:1], mem[:1], 0.4)[0]
    torch.testing.assert_close(logprobs.double(), joint[tokens].to(logprobs.device), atol=2e-5, rtol=0)


# A vocabulary of three full 4096-token chunks and a partial one ending in a partial 256-token block; the heavy
# tokens sit on both sides of block and chunk edges, where an off-by-one in the CPU kernel's two-level pick would
# move their mass.
BIG_VOCAB = 3 * 4096 + 2 * 256 + 41
EDGE_TOKENS = [0, 1, 255, 256, 511, 512, 4095, 4096, 4351, 4352, 8191, 8192, 12287, 12288, BIG_VOCAB - 1]
BIG_FILTERS = [{"temperature": 0.9}, {"top_k": 23}, {"top_p": 0.8, "temperature": 1.1}]


def edge_heavy_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, BIG_VOCAB] base and memory logits: noise everywhere, and most of the mass on EDGE_TOKENS."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, BIG_VOCAB, generator=g) - 1.5
    mem = 1.5 * torch.randn(1, BIG_VOCAB, generator=g) - 2.5
    base[0, EDGE_TOKENS] += 7.5 + torch.rand(len(EDGE_TOKENS), generator=g)
    mem[0, EDGE_TOKENS[1::2]] += 9.0 + torch.rand(len(EDGE_TOKENS[1::2]), generator=g)
    return base, mem


def edge_bins(probs: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin id per token: each edge token alone, the other kept tokens by block; bins expecting < 5 draws merged."""
    bins = torch.arange(BIG_VOCAB) // 256 + len(EDGE_TOKENS)
    bins[EDGE_TOKENS] = torch.arange(len(EDGE_TOKENS))
    expected = torch.zeros(int(bins.max()) + 1, dtype=torch.float64).index_add_(0, bins, probs) * draws
    small = expected < 5
    extra = expected[small].sum()
    # the small ones share one extra bin, or join the largest bin when even together they expect < 5
    into = len(expected) if extra >= 5 else int(expected.argmax())
    merged = torch.where(small[bins], torch.full_like(bins, into), bins)
    out = torch.cat([torch.where(small, 0.0, expected), torch.zeros(1, dtype=torch.float64)])
    out[into] += extra
    return merged, out


@compiled
@pytest.mark.parametrize("threads,per_call", [(1, "all"), (2, "all"), (2, 1)], ids=["1-thread", "2-threads-rows",
                                                                                     "2-threads-split-row"])
@pytest.mark.parametrize("filters", BIG_FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_sampling_across_blocks_and_chunks_follows_exact_distribution(threads, per_call, filters):
    # per_call=1: one row per call on 2 threads, so that the row's chunks are split across the threads
    draws = 6000 if per_call == "all" else 1000
    base, mem = edge_heavy_logits(fresh_seed())
    probs = exact_distribution(base, mem, 0.3, **filters)
    gen = torch.Generator().manual_seed(fresh_seed())

    def run():
        if per_call == "all":
            return ops.sample(base.expand(draws, -1), mem.expand(draws, -1), 0.3, generator=gen, **filters)
        outs = [ops.sample(base, mem, 0.3, generator=gen, **filters) for _ in range(draws)]
        return torch.cat([t for t, _ in outs]), torch.cat([lp for _, lp in outs])

    tokens, logprobs = with_threads(threads, run)
    counts = torch.bincount(tokens, minlength=BIG_VOCAB).double()
    assert counts[probs == 0].sum() == 0, "a filtered-out token was drawn"
    bins, expected = edge_bins(probs, draws)
    observed = torch.zeros_like(expected).index_add_(0, bins, counts)
    keep = expected > 0
    stat, pvalue = chisquare(observed[keep].numpy(), expected[keep].numpy())
    print(f"kept {int((probs > 0).sum())}/{BIG_VOCAB} tokens in {int(keep.sum())} bins, chi2 {stat:.1f}, p {pvalue:.3g}")
    assert pvalue > 1e-5
    torch.testing.assert_close(logprobs.double(), mixture_logp(base, mem, 0.3)[0][tokens], atol=2e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_settings_in_one_batch(device):
    vocab, half = 19, 20000
    base, mem = sample_inputs(1, vocab, device, seed=5)
    base, mem = base.expand(2 * half, vocab), mem.expand(2 * half, vocab)
    top_k = torch.tensor([3] * half + [0] * half, device=device)
    temperature = torch.tensor([1.0] * half + [0.0] * half, device=device)
    tokens, _ = ops.sample(base, mem, 0.5, temperature=temperature, top_k=top_k,
                           generator=torch.Generator(device=device).manual_seed(0))
    top3 = exact_distribution(base, mem, 0.5, top_k=3)
    counts = torch.bincount(tokens[:half].cpu(), minlength=vocab).double()
    assert counts[top3 == 0].sum() == 0
    assert chisquare(counts[top3 > 0].numpy(), (top3[top3 > 0] * half).numpy()).pvalue > 1e-5
    greedy = reference.component_logprobs(base[:1], mem[:1], 0.5)[0].argmax().item()
    assert (tokens[half:] == greedy).all()


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_keeps_ties_with_kth_value(device):
    base = torch.full((1, 10), -5.0, device=device)
    base[0, :4] = torch.tensor([3.0, 2.0, 2.0, 2.0])
    draws = 4000
    tokens, _ = ops.sample(base.expand(draws, 10), base.expand(draws, 10), 0.0, top_k=2,
                           generator=torch.Generator(device=device).manual_seed(1))
    assert set(tokens.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_always_keeps_the_best_token(device):
    base, mem = sample_inputs(50, 300, device)
    tokens, _ = ops.sample(base, mem, 0.2, top_p=1e-6, generator=torch.Generator(device=device).manual_seed(0))
    greedy, _ = ops.sample(base, mem, 0.2, temperature=0.0)
    assert torch.equal(tokens, greedy)


# ---------------------------------------------------------------- randomness


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens(device):
    base, mem = sample_inputs(64, 5000, device, torch.bfloat16, torch.float16)
    draw = lambda seed: ops.sample(base, mem, 0.5, top_p=0.95, generator=torch.Generator(device=device).manual_seed(seed))[0]
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


@pytest.mark.parametrize("device", DEVICES)
def test_generator_advances_between_calls(device):
    base, mem = sample_inputs(64, 5000, device)
    gen = torch.Generator(device=device).manual_seed(3)
    first = ops.sample(base, mem, 0.5, generator=gen)[0]
    second = ops.sample(base, mem, 0.5, generator=gen)[0]
    assert not torch.equal(first, second)


# ---------------------------------------------------------------- rows split across threads (CPU)


def with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 50257), (1, 37), (3, 50257)])
def test_row_split_across_threads_matches_one_thread(dtype, rows, vocab):
    # a row is cut into fixed chunks whatever the thread count, so the results are bit-identical
    base, mem = sample_inputs(rows, vocab, "cpu", dtype, dtype, strided=True)
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0))

    def run():
        out = [ops.joint_logprobs(base, mem, 0.3), *ops.target_logprobs(base, mem, targets, 0.3)]
        for filters in ({"temperature": 0.0}, {"temperature": 0.8, "top_k": 50, "top_p": 0.9},
                        {"temperature": 1.0, "top_p": 0.5}, {"temperature": 1.2, "min_p": 0.01}, {}):
            for seed in range(3):
                out += ops.sample(base, mem, 0.3, generator=torch.Generator().manual_seed(seed), **filters)
        return out

    one, two = with_threads(1, run), with_threads(2, run)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@compiled
def test_rows_longer_than_64_chunks():
    # rows of more than 64 x 4096 tokens merge their statistics in several rounds
    base, mem = sample_inputs(2, 300_001, "cpu")
    joint = reference.component_logprobs(base, mem, 0.4)[0]
    for got in (ops.joint_logprobs(base, mem, 0.4), ops.joint_logprobs(base[:1], mem[:1], 0.4)):
        assert_close_to_reference(got, joint[: got.shape[0]], torch_float32_joint(base, mem, 0.4)[: got.shape[0]])
    tokens, _ = ops.sample(base, mem, 0.4, temperature=0.0)
    assert torch.equal(tokens, joint.argmax(-1))


@compiled
@pytest.mark.parametrize("filters", [{"top_p": 0.3}, {"top_p": 0.9, "temperature": 0.7}, {"top_k": 20, "top_p": 0.8}])
def test_top_p_on_a_large_vocabulary_keeps_the_nucleus(filters):
    # top-p sorts only the tokens heavy enough to matter; the nucleus must be the same as the reference's
    rows, vocab = 400, 50257
    base, mem = sample_inputs(1, vocab, "cpu", seed=3)
    base, mem = (base * 2).expand(rows, vocab), mem.expand(rows, vocab)
    tokens, _ = ops.sample(base, mem, 0.3, generator=torch.Generator().manual_seed(0), **filters)
    logp = reference.component_logprobs(base[:1], mem[:1], 0.3)[0]
    kept = torch.isfinite(reference.filtered_logits(logp, **filters))[0]
    assert kept[tokens].all()
    assert len(set(tokens.tolist())) > 1


# ---------------------------------------------------------------- gradients


def grad_inputs(device, dtype, per_row_params: bool, rows: int = 5, vocab: int = 37):
    """Leaf logits (strided) and parameters requiring grad, and their float64 twins."""
    base, mem = sample_inputs(rows, vocab, device, dtype, torch.float32, strided=True,
                              seed=int(torch.randint(0, 2**31, ())))
    base = base.detach().requires_grad_()
    mem = mem.detach().requires_grad_()
    if per_row_params:
        params = {"lmbda": per_row(rows, 0.1, 0.9, device), "knn_temp": per_row(rows, 0.5, 2.0, device, seed=2),
                  "base_temp": per_row(rows, 0.5, 2.0, device, seed=3)}
        params = {k: v.requires_grad_() for k, v in params.items()}
    else:
        params = {"lmbda": 0.35, "knn_temp": 0.8, "base_temp": 1.7}
    twins = [t.detach().double().requires_grad_() for t in (base, mem)]
    twin_params = {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v
                   for k, v in params.items()}
    return (base, mem, params), (*twins, twin_params)


def leaves(base, mem, params):
    return [base, mem, *(v for v in params.values() if isinstance(v, torch.Tensor))]


def assert_grads_close(got, want, inputs) -> None:
    """Each gradient in its input's dtype, within float32 (or bfloat16) rounding of the float64 one."""
    for g, w, x in zip(got, want, inputs, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        scale = w.abs().max().item()
        err = (g.double() - w).abs().max().item()
        print(f"grad max error {err:.3g} (scale {scale:.3g})")
        tol = 1e-5 if g.dtype == torch.float32 else 8e-3
        assert err <= tol * max(scale, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row_params", [False, True], ids=["scalars", "per_row"])
def test_joint_logprobs_gradients_match_reference(device, dtype, per_row_params):
    (base, mem, params), (b64, m64, p64) = grad_inputs(device, dtype, per_row_params)
    out = ops.joint_logprobs(base, mem, **params)
    assert out.requires_grad
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves(base, mem, params), upstream)
    want_out = reference.component_logprobs(b64, m64, **p64)[0]
    want = torch.autograd.grad(want_out, leaves(b64, m64, p64), upstream.double())
    assert_grads_close(got, want, leaves(base, mem, params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row_params", [False, True], ids=["scalars", "per_row"])
def test_target_logprobs_gradients_match_reference(device, per_row_params):
    (base, mem, params), (b64, m64, p64) = grad_inputs(device, torch.float32, per_row_params, rows=9, vocab=23)
    targets = torch.randint(0, 23, (9,), device=device)
    outs = ops.target_logprobs(base, mem, targets, **params)
    upstream = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, leaves(base, mem, params), upstream)
    want_outs = [o.gather(1, targets[:, None]).squeeze(1) for o in reference.component_logprobs(b64, m64, **p64)]
    want = torch.autograd.grad(want_outs, leaves(b64, m64, p64), [u.double() for u in upstream])
    assert_grads_close(got, want, leaves(base, mem, params))


class ReferenceWithVjp(torch.autograd.Function):
    """The reference forward with the closed-form backward that the compiled ops use."""

    @staticmethod
    def forward(ctx, base, mem, lmbda, knn_temp, base_temp):
        ctx.save_for_backward(base, mem, lmbda, knn_temp, base_temp)
        return reference.component_logprobs(base, mem, lmbda, knn_temp, base_temp)

    @staticmethod
    def backward(ctx, g_joint, g_base, g_mem):
        return reference.mixture_vjp(*ctx.saved_tensors, g_joint, g_base, g_mem)


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 1.0])
def test_mixture_vjp_gradcheck(lmbda):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    base, mem = (3 * torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(2))
    base[0, 2] = -math.inf  # a masked token
    params = [torch.full((3,), lmbda, dtype=torch.float64), 0.5 + torch.rand(3, generator=g, dtype=torch.float64),
              0.5 + torch.rand(3, generator=g, dtype=torch.float64)]
    inputs = [t.requires_grad_(not (i == 2 and lmbda in (0.0, 1.0))) for i, t in enumerate([base, mem, *params])]
    # a one-sided lmbda at 0 or 1 has no two-sided finite difference; the masked token has no gradient
    assert torch.autograd.gradcheck(lambda *x: tuple(torch.nan_to_num(y, neginf=0.0) for y in ReferenceWithVjp.apply(*x)),
                                    inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_is_not_differentiable(device):
    base, mem = sample_inputs(3, 40, device)
    base = base.detach().requires_grad_()
    lmbda = per_row(3, 0.2, 0.8, device).requires_grad_()
    rp = ops.pack_row_params(3, device, lmbda=lmbda)
    assert rp.requires_grad
    calls = [lambda: ops.sample(base, mem, lmbda), lambda: reference.sample(base, mem, lmbda)]
    if ops.compiled_available():  # sample_rows is the kernels' entry only
        calls.append(lambda: ops.sample_rows(base, mem, rp))
    for call in calls:
        tokens, logprobs = call()
        assert not tokens.requires_grad and not logprobs.requires_grad


# ---------------------------------------------------------------- invalid input


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", [math.nan, math.inf, "all_neg_inf"])
def test_invalid_rows_are_flagged_not_sampled(device, poison):
    base, mem = sample_inputs(3, 50, device)
    base = base.clone()
    if poison == "all_neg_inf":
        base[1] = -math.inf
    else:
        base[1, 17] = poison
    for temperature in (0.0, 1.0):
        tokens, logprobs = ops.sample(base, mem, 0.5, temperature=temperature)
        assert tokens[1] == -1 and math.isnan(logprobs[1])
        assert 0 <= tokens[0] < 50 and 0 <= tokens[2] < 50
    assert torch.isnan(ops.joint_logprobs(base, mem, 0.5)[1]).all()
    # the poisoned model carries no weight: the row is valid
    assert ops.sample(base, mem, 1.0, temperature=0.0)[0][1] >= 0


@pytest.mark.parametrize("device", DEVICES)
def test_masked_tokens_are_never_drawn(device):
    base, mem = sample_inputs(2000, 40, device)
    base, mem = base.clone(), mem.clone()
    base[:, :20] = -math.inf
    mem[:, :20] = -math.inf
    tokens, _ = ops.sample(base, mem, 0.5, generator=torch.Generator(device=device).manual_seed(0))
    assert (tokens >= 20).all()


BAD_ARGS = [
    ({"lmbda": 1.5}, "lmbda"),
    ({"lmbda": -0.1}, "lmbda"),
    ({"lmbda": math.nan}, "lmbda"),
    ({"knn_temp": 0.0}, "knn_temp"),
    ({"base_temp": -1.0}, "base_temp"),
    ({"base_temp": 1e39}, "base_temp"),
    ({"knn_temp": torch.tensor([1.0, 1e39], dtype=torch.float64)}, "knn_temp"),
    ({"temperature": 1e39}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.2}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"lmbda": torch.tensor([0.5, 2.0])}, "lmbda"),
    ({"lmbda": torch.tensor([0.5, 0.5, 0.5])}, "lmbda"),
    ({"top_k": torch.tensor([1.0, 2.0])}, "top_k"),
]


@pytest.mark.parametrize("kwargs,name", BAD_ARGS, ids=[n for _, n in BAD_ARGS])
@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
def test_bad_parameters_name_the_argument(impl, kwargs, name):
    base, mem = sample_inputs(2, 10, "cpu")
    args = {"lmbda": 0.5} | kwargs
    with pytest.raises(ValueError, match=name):
        impl.sample(base, mem, **args)


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
def test_bad_tensors_name_the_argument(impl):
    base, mem = sample_inputs(2, 10, "cpu")
    with pytest.raises(ValueError, match="mem_logits"):
        impl.joint_logprobs(base, mem[:, :9], 0.5)
    with pytest.raises(ValueError, match="base_logits"):
        impl.joint_logprobs(base[0], mem, 0.5)
    with pytest.raises(ValueError, match="base_logits"):
        impl.joint_logprobs(base.double(), mem, 0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        impl.joint_logprobs(base[:, :1], mem[:, :1], 0.5)
    with pytest.raises(ValueError, match="targets"):
        impl.target_logprobs(base, mem, torch.tensor([0, 10]), 0.5)
    with pytest.raises(ValueError, match="targets"):
        impl.target_logprobs(base, mem, torch.tensor([0]), 0.5)


@compiled
def test_raw_op_checks_scalars_too():
    base, mem = sample_inputs(2, 10, "cpu")
    with pytest.raises(ValueError, match="top_p"):
        torch.ops.memdec_fast.sample(base, mem, None, 0.5, 1.0, 1.0, 1.0, 0, 0.0, 0.0, None)
    with pytest.raises(ValueError, match="row_params"):
        torch.ops.memdec_fast.sample(base, mem, torch.zeros(2, 3), 0.5, 1.0, 1.0, 1.0, 0, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="knn_temp"):
        torch.ops.memdec_fast.joint_logprobs(base, mem, None, 0.5, 1e39, 1.0)


def test_pack_row_params_rejects_unknown_names():
    with pytest.raises(TypeError, match="'lmda'.*lmbda, knn_temp, base_temp, temperature, top_k, top_p, min_p"):
        ops.pack_row_params(2, "cpu", lmda=0.9)


def raw_calls(base, mem, row_params=None, targets=None):
    """Each raw op once, with these tensors."""
    tgt = targets if targets is not None else torch.zeros(base.shape[0], dtype=torch.long, device=base.device)
    return {
        "joint_logprobs": lambda: torch.ops.memdec_fast.joint_logprobs(base, mem, row_params, 0.5, 1.0, 1.0),
        "target_logprobs": lambda: torch.ops.memdec_fast.target_logprobs(base, mem, tgt, row_params, 0.5, 1.0, 1.0),
        "sample": lambda: torch.ops.memdec_fast.sample(base, mem, row_params, 0.5, 1.0, 1.0, 0.0, 0, 1.0, 0.0, None),
    }


@compiled
@pytest.mark.parametrize("op", ["joint_logprobs", "target_logprobs", "sample"])
@pytest.mark.parametrize("meta", ["base_logits", "mem_logits", "row_params", "targets"])
def test_meta_tensor_among_real_ones_is_refused(op, meta):
    # the dispatcher runs the Meta (fake) kernel when any input is meta: it must raise, not return garbage
    base, mem = sample_inputs(4, 11, "cpu", seed=int(torch.randint(0, 2**31, ())))
    args = {"base": base, "mem": mem, "row_params": ops.pack_row_params(4, "cpu", lmbda=0.5),
            "targets": torch.arange(4)}
    key = {"base_logits": "base", "mem_logits": "mem"}.get(meta, meta)
    args[key] = args[key].to("meta")
    if meta == "targets" and op != "target_logprobs":
        pytest.skip("the op takes no targets")
    with pytest.raises(ValueError, match=meta if meta != "base_logits" else "mem_logits|row_params|targets"):
        raw_calls(**args)[op]()


def test_meta_inputs_are_refused_by_the_wrappers():
    base, mem = sample_inputs(4, 11, "cpu")
    if ops.compiled_available():  # sample_rows is the kernels' entry only
        with pytest.raises(ValueError, match="row_params"):
            ops.sample_rows(base, mem, ops.pack_row_params(4, "meta"))
    with pytest.raises(ValueError, match="targets"):
        ops.target_logprobs(base, mem, torch.arange(4, device="meta"), 0.5)
    with pytest.raises(ValueError, match="lmbda"):
        ops.joint_logprobs(base, mem, torch.full((4,), 0.5, device="meta"))
    with pytest.raises(ValueError, match="mem_logits"):
        ops.sample(base, mem.to("meta"), 0.5)


@compiled
def test_all_meta_inputs_give_shapes():
    base, mem = (t.to("meta") for t in sample_inputs(4, 11, "cpu"))
    for name, call in raw_calls(base, mem, ops.pack_row_params(4, "meta")).items():
        out = call()
        out = out if isinstance(out, tuple) else (out,)
        assert all(t.is_meta for t in out), name
    assert ops.joint_logprobs(base, mem, 0.5).shape == (4, 11)


# ---------------------------------------------------------------- registration


@compiled
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    base, mem = sample_inputs(4, 33, device, torch.bfloat16, torch.float32, strided=True)
    rp = ops.pack_row_params(4, device, lmbda=0.3, temperature=0.7, top_k=5)
    targets = torch.arange(4, device=device)
    torch.library.opcheck(torch.ops.memdec_fast.joint_logprobs.default, (base, mem, None, 0.3, 1.0, 1.0))
    torch.library.opcheck(torch.ops.memdec_fast.target_logprobs.default, (base, mem, targets, rp, 0.3, 1.0, 1.0))
    grad_args = [t.detach().requires_grad_() for t in (base.float(), mem, rp)]  # the autograd registration too
    torch.library.opcheck(torch.ops.memdec_fast.joint_logprobs.default, (*grad_args, 0.3, 1.0, 1.0))
    torch.library.opcheck(torch.ops.memdec_fast.target_logprobs.default,
                          (grad_args[0], grad_args[1], targets, grad_args[2], 0.3, 1.0, 1.0))
    # greedy rows keep the sample deterministic, as opcheck compares repeated runs
    torch.library.opcheck(torch.ops.memdec_fast.sample.default,
                          (base, mem, None, 0.3, 1.0, 1.0, 0.0, 0, 1.0, 0.0, None))


@compiled
def test_torch_compile_traces_the_ops():
    base, mem = sample_inputs(3, 50, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(b, m):
        return ops.sample_rows(b, m, ops.pack_row_params(3, "cpu", lmbda=0.5, temperature=0.0))

    tokens, _ = step(base, mem)
    assert torch.equal(tokens, ops.sample(base, mem, 0.5, temperature=0.0)[0])


def test_extension_missing_falls_back_with_one_warning(tmp_path):
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import torch, memdec_fast\n"
        "from memdec_fast import ops\n"
        "assert not ops.compiled_available()\n"
        "print(ops.sample(torch.randn(2, 9), torch.randn(2, 9), 0.5, temperature=0.0)[0].shape)\n"
        "try:\n    ops.require_compiled()\nexcept RuntimeError as e:\n    print('raised', e)\n"
    )
    package_root = str(Path(ops.__file__).parents[1])  # the memdec_fast under test: a checkout or site-packages
    env = dict(os.environ, MEMDEC_FAST_DISABLE_EXTENSION="1", PYTHONPATH=package_root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "torch.Size([2])" in out.stdout
    assert "raised memdec_fast: the compiled extension" in out.stdout
    assert out.stderr.count("could not be loaded") == 1


@pytest.mark.skipif(os.environ.get("MEMDEC_FAST_EXPECT_CUDA") != "1", reason="CI asserts the CUDA build")
def test_cuda_sources_were_compiled():
    info = build_info()
    assert info["cuda"] and info["cuda_archs"], info


# ---------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_agrees_with_cpu(dtype):
    base, mem = sample_inputs(257, 50257, "cuda", dtype, dtype, strided=True)
    lmbda = per_row(257, 0, 1, "cuda")
    torch.testing.assert_close(ops.joint_logprobs(base, mem, lmbda).cpu(),
                               ops.joint_logprobs(base.cpu(), mem.cpu(), lmbda.cpu()), atol=2e-5, rtol=2e-6)
    gpu = ops.sample(base, mem, lmbda, temperature=0.0)
    cpu = ops.sample(base.cpu(), mem.cpu(), lmbda.cpu(), temperature=0.0)
    assert (gpu[0].cpu() == cpu[0]).float().mean() > 0.99
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=2e-5, rtol=0)


@compiled
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_replays_draw_fresh_numbers():
    base, mem = sample_inputs(256, 1000, "cuda")
    rp = ops.pack_row_params(256, "cuda", lmbda=0.5)
    ops.sample_rows(base, mem, rp)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, _ = ops.sample_rows(base, mem, rp)
    graph.replay()
    first = tokens.clone()
    graph.replay()
    assert not torch.equal(first, tokens)


@compiled
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("op", ["joint_logprobs", "target_logprobs", "sample"])
@pytest.mark.parametrize("moved", ["base_logits", "mem_logits", "row_params", "targets"])
def test_mixed_cpu_and_cuda_tensors_are_refused(op, moved):
    if moved == "targets" and op != "target_logprobs":
        pytest.skip("the op takes no targets")
    base, mem = sample_inputs(4, 11, "cuda")
    args = {"base": base, "mem": mem, "row_params": ops.pack_row_params(4, "cuda", lmbda=0.5),
            "targets": torch.arange(4, device="cuda")}
    key = {"base_logits": "base", "mem_logits": "mem"}.get(moved, moved)
    args[key] = args[key].cpu()
    with pytest.raises(ValueError, match="on cpu|on cuda"):
        raw_calls(**args)[op]()
