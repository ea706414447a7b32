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

from memdec_fast import build_info, ops, reference

pytestmark = pytest.mark.skipif(not ops.compiled_available(), reason="compiled extension not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
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


def exact_distribution(base, mem, lmbda, **filters) -> torch.Tensor:
    """The filtered mixture that sampling must follow, float64 [V] (row 0)."""
    logp = reference.component_logprobs(base[:1], mem[:1], lmbda)[0]
    return torch.softmax(reference.filtered_logits(logp, **filters), -1)[0].cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_sampling_follows_exact_distribution(device, filters):
    vocab, draws = 23, 40000
    base, mem = sample_inputs(1, vocab, device, seed=11)
    base, mem = base.expand(draws, vocab), mem.expand(draws, vocab)  # rows draw independently
    gen = torch.Generator(device=device).manual_seed(1234)
    tokens, logprobs = ops.sample(base, mem, 0.4, generator=gen, **filters)
    probs = exact_distribution(base, mem, 0.4, **filters)
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    stat, pvalue = chisquare(counts[kept].numpy(), (probs[kept] * draws).numpy())
    print(f"kept {int(kept.sum())}/{vocab}, chi2 {stat:.1f}, p {pvalue:.3g}")
    assert pvalue > 1e-5
    joint = reference.component_logprobs(base[:1], mem[:1], 0.4)[0][0]
    torch.testing.assert_close(logprobs.double(), joint[tokens].to(logprobs.device), atol=2e-5, rtol=0)


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


def test_raw_op_checks_scalars_too():
    base, mem = sample_inputs(2, 10, "cpu")
    with pytest.raises(ValueError, match="top_p"):
        torch.ops.memdec_fast.sample(base, mem, None, 0.5, 1.0, 1.0, 1.0, 0, 0.0, 0.0, None)
    with pytest.raises(ValueError, match="row_params"):
        torch.ops.memdec_fast.sample(base, mem, torch.zeros(2, 3), 0.5, 1.0, 1.0, 1.0, 0, 1.0, 0.0, None)


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    base, mem = sample_inputs(4, 33, device, torch.bfloat16, torch.float32, strided=True)
    rp = ops.pack_row_params(4, device, lmbda=0.3, temperature=0.7, top_k=5)
    targets = torch.arange(4, device=device)
    torch.library.opcheck(torch.ops.memdec_fast.joint_logprobs.default, (base, mem, None, 0.3, 1.0, 1.0))
    torch.library.opcheck(torch.ops.memdec_fast.target_logprobs.default, (base, mem, targets, rp, 0.3, 1.0, 1.0))
    # greedy rows keep the sample deterministic, as opcheck compares repeated runs
    torch.library.opcheck(torch.ops.memdec_fast.sample.default,
                          (base, mem, None, 0.3, 1.0, 1.0, 0.0, 0, 1.0, 0.0, None))


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
