"""The CUDA kernels' source (csrc/kernels/*.cuh), run on the CPU under the shim, against the float64 references.

Passing here says the kernels' logic is right (indexing, reductions, scans, shuffles, ballots, atomics, barriers
and the Philox pick) on the CPU's memory model and math library; it says nothing of speed or of GPU-only
behaviour: benchmarks/NOTES.md ("The CPU harness") lists what it can and cannot prove.
"""

from __future__ import annotations

import itertools
import math

import cudacpu_fixtures
import pytest
import torch
from cudacpu_harness import PARAM_NAMES, SAMPLERS, Case, run_case
from cudacpu_reference import exact_pick, rounding_picks, row_uniform

from memdec_fast import reference

driver, work = cudacpu_fixtures.driver, cudacpu_fixtures.work  # the harness's fixtures

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_PAIRS = list(itertools.product(DTYPES, DTYPES))

# One row per behaviour: (lmbda, knn_temp, base_temp, temperature, top_k, top_p, min_p), and what the row's
# logits hold. Rows 7-10 test validity: a NaN in an unused model is fine, in a used one the row is invalid.
ROWS = [
    ((0.25, 1.0, 1.0, 1.0, 0, 1.0, 0.0), "masked"),  # some -inf entries: never picked
    ((0.5, 1.0, 1.0, 0.0, 0, 1.0, 0.0), ""),  # greedy
    ((0.3, 1.0, 1.0, 0.8, 20, 1.0, 0.0), ""),  # top-k
    ((0.1, 1.0, 1.0, 1.0, 0, 0.9, 0.0), ""),  # top-p
    ((0.4, 1.0, 1.0, 1.3, 0, 1.0, 0.05), ""),  # min-p
    ((0.6, 0.5, 2.0, 0.9, 50, 0.8, 0.02), ""),  # all filters, both temperatures
    ((0.2, 1.0, 1.0, 1.0, 5, 1.0, 0.0), "ties"),  # top-k with ties at the k-th value: all kept
    ((0.0, 1.0, 1.0, 1.0, 0, 0.95, 0.0), "mem_nan"),  # memory unused: its NaN does not matter
    ((1.0, 1.0, 1.0, 0.7, 0, 1.0, 0.0), "base_all_neginf"),  # base unused
    ((0.5, 1.0, 1.0, 1.0, 0, 1.0, 0.0), "base_nan"),  # invalid
    ((0.5, 1.0, 1.0, 1.0, 0, 1.0, 0.0), "mem_posinf"),  # invalid
    ((0.5, 1.0, 1.0, 0.0, 0, 1.0, 0.0), "all_neginf"),  # invalid, greedy
]


def make_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int, pad: int = 0) -> torch.Tensor:
    """Logits [rows, vocab] in `dtype`; rows `pad` elements apart beyond vocab when pad > 0 (a strided view)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(rows, vocab + pad, generator=g) * 3
    return full.to(dtype)[:, :vocab]


def behaviour_case(kernel: str, base_dtype: torch.dtype, mem_dtype: torch.dtype, vocab: int, seed: int,
                   strided: bool) -> Case:
    """The ROWS table over [len(ROWS), vocab] logits, with the special values each row asks for."""
    rows = len(ROWS)
    base = make_logits(rows, vocab, base_dtype, seed, pad=17 if strided else 0)
    mem = make_logits(rows, vocab, mem_dtype, seed + 1, pad=0)
    g = torch.Generator().manual_seed(seed + 2)
    for r, (_, what) in enumerate(ROWS):
        idx = torch.randperm(vocab, generator=g)[: max(1, vocab // 10)]
        if what == "masked":
            base[r, idx] = -math.inf
            mem[r, idx] = -math.inf
        elif what == "ties":
            base[r] = torch.randint(0, 4, (vocab,), generator=g).to(base_dtype)
            mem[r] = torch.randint(0, 4, (vocab,), generator=g).to(mem_dtype)
        elif what == "mem_nan":
            mem[r, idx] = math.nan
        elif what == "base_all_neginf":
            base[r] = -math.inf
        elif what == "base_nan":
            base[r, idx[0]] = math.nan
        elif what == "mem_posinf":
            mem[r, idx[0]] = math.inf
        elif what == "all_neginf":
            base[r] = -math.inf
            mem[r] = -math.inf
    table = torch.tensor([p for p, _ in ROWS], dtype=torch.float32)
    targets = None
    if kernel == "target":
        targets = torch.randint(0, vocab, (rows,), generator=g)
        targets[3], targets[4] = -1, vocab  # out of range: NaN
    return Case(kernel, base, mem, table=table, targets=targets, seed=1234 + seed, offset=8 * seed + 4)


def reference_logprobs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p, log p_base, log p_mem, float64 [B, V]."""
    p = case.row_params()
    return reference.component_logprobs(case.base, case.mem, p["lmbda"], p["knn_temp"], p["base_temp"])


def assert_logprobs_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """float32 kernel math against float64: same NaN and inf positions, and close elsewhere."""
    want = want.float()
    finite = torch.isfinite(want) & torch.isfinite(got)
    diff = (got - want).abs()[finite]
    print(f"{what}: max |diff| {diff.max().item() if diff.numel() else 0:.3g}, "
          f"mean {diff.mean().item() if diff.numel() else 0:.3g}")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, equal_nan=True, msg=what)


def check_joint(driver, work, case: Case) -> torch.Tensor:
    got = run_case(driver, case, work)["logprobs"]
    assert_logprobs_close(got, reference_logprobs(case)[0], "joint log p")
    return got


def check_sample(driver, work, case: Case) -> None:
    """Tokens equal the reference's Philox inverse-CDF pick; log-probs are the unfiltered log p of the token."""
    out = run_case(driver, case, work)
    joint_case = Case("joint", case.base, case.mem, case.params, case.table)
    kernel_logp = run_case(driver, joint_case, work)["logprobs"]  # the kernel's own float32 log p
    logp = reference_logprobs(case)[0]
    params = case.row_params()
    seed = case.seed
    offset = case.offset + case.offset_intragraph if case.captured else case.offset
    inexact = 0
    for r in range(logp.shape[0]):
        token = int(out["tokens"][r])
        if torch.isnan(logp[r]).any():
            assert token == -1 and math.isnan(out["logprobs"][r]), f"row {r}: invalid, got token {token}"
            continue
        row = {n: float(params[n][r]) for n in PARAM_NAMES}
        if row["temperature"] == 0:
            assert token == int(logp[r].argmax()), f"sample row {r}: greedy token {token}, argmax {logp[r].argmax()}"
        else:
            u = row_uniform(seed, offset, r)
            exact = exact_pick(logp[r], row, u)
            if token != exact:  # only a draw or a cut at float32 rounding distance of a boundary may differ
                around = rounding_picks([logp[r], kernel_logp[r].double()], row, u)
                assert token in around, (f"sample row {r}: token {token}, the reference picks {exact} (rounding allows "
                                         f"{sorted(around)}); {row}")
                inexact += 1
        torch.testing.assert_close(out["logprobs"][r], logp[r, token].float(), rtol=2e-5, atol=2e-5)
    print(f"sample: {inexact} of {logp.shape[0]} rows picked a token only float32 rounding explains")
    assert inexact <= max(1, logp.shape[0] // 8)


@pytest.mark.parametrize("base_dtype,mem_dtype", DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
def test_joint_logprobs(driver, work, base_dtype, mem_dtype):
    case = behaviour_case("joint", base_dtype, mem_dtype, 1531, seed=1, strided=base_dtype != mem_dtype)
    check_joint(driver, work, case)


@pytest.mark.parametrize("base_dtype,mem_dtype", DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
def test_target_logprobs(driver, work, base_dtype, mem_dtype):
    case = behaviour_case("target", base_dtype, mem_dtype, 1531, seed=2, strided=base_dtype == mem_dtype)
    out = run_case(driver, case, work)
    joint, lp_base, lp_mem = reference_logprobs(case)
    t = case.targets
    ok = (t >= 0) & (t < case.base.shape[1])
    idx = t.clamp(0, case.base.shape[1] - 1)[:, None]
    for name, full in (("joint", joint), ("base", lp_base), ("mem", lp_mem)):
        want = torch.where(ok, full.gather(1, idx).squeeze(1), math.nan)
        assert_logprobs_close(out[name], want, f"target log p ({name})")


@pytest.mark.parametrize("kernel", SAMPLERS)
@pytest.mark.parametrize("base_dtype,mem_dtype", DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
def test_sample(driver, work, base_dtype, mem_dtype, kernel):
    case = behaviour_case(kernel, base_dtype, mem_dtype, 1531, seed=3, strided=base_dtype != mem_dtype)
    check_sample(driver, work, case)


@pytest.mark.parametrize("kernel", SAMPLERS)
@pytest.mark.parametrize("vocab", [2, 31, 512, 513, 4099, 50257])
def test_vocab_sizes(driver, work, vocab, kernel):
    """Odd, power-of-two and GPT-2's vocabularies, rows strided in a padded one; all filters at once."""
    base = make_logits(3, vocab, torch.bfloat16, seed=vocab, pad=64 - vocab % 64)
    mem = make_logits(3, vocab, torch.float32, seed=vocab + 1)
    params = {"lmbda": 0.3, "temperature": 0.9, "top_k": min(40, vocab - 1), "top_p": 0.9, "min_p": 0.01}
    check_joint(driver, work, Case("joint", base, mem, params))
    check_sample(driver, work, Case(kernel, base, mem, params, seed=vocab, offset=12))


@pytest.mark.parametrize("params", [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 3},
    {"temperature": 1.2, "top_p": 0.5},
    {"temperature": 1.0, "top_p": 0.3, "min_p": 0.1},
], ids=str)
@pytest.mark.parametrize("kernel", SAMPLERS)
def test_many_rows_scalars(driver, work, params, kernel):
    """48 rows with the call's scalars (no table): each row draws its own number from the same Philox call."""
    base = make_logits(48, 300, torch.float16, seed=7)
    mem = make_logits(48, 300, torch.float32, seed=8)
    check_sample(driver, work, Case(kernel, base, mem, {"lmbda": 0.4, **params}, seed=99, offset=40))


@pytest.mark.parametrize("kernel", SAMPLERS)
def test_captured_philox_state(driver, work, kernel):
    """Under CUDA-graph capture the seed and offset come through pointers, plus the intra-graph offset."""
    base = make_logits(6, 700, torch.float32, seed=11)
    mem = make_logits(6, 700, torch.float32, seed=12)
    params = {"lmbda": 0.5, "top_p": 0.95}
    direct = Case(kernel, base, mem, params, seed=2**63 + 5, offset=4 * 7 + 8)
    captured = Case(kernel, base, mem, params, seed=2**63 + 5, offset=4 * 7, captured=True, offset_intragraph=8)
    assert torch.equal(run_case(driver, direct, work)["tokens"], run_case(driver, captured, work)["tokens"])
    check_sample(driver, work, captured)


@pytest.mark.sanitize
@pytest.mark.parametrize("kernel", ["joint", "target", *SAMPLERS])
@pytest.mark.parametrize("base_dtype,mem_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_sanitize_cases(driver, work, kernel, base_dtype, mem_dtype):
    """Every kernel over the ROWS table (every filter, special values) at a small odd vocabulary, strided and
    contiguous rows: what sanitize.sh runs under TSan and ASan + UBSan."""
    case = behaviour_case(kernel, base_dtype, mem_dtype, 389, seed=5, strided=base_dtype == torch.float16)
    if kernel == "joint":
        check_joint(driver, work, case)
    elif kernel in SAMPLERS:
        check_sample(driver, work, case)
    else:
        out = run_case(driver, case, work)
        ok = (case.targets >= 0) & (case.targets < 389)
        want = reference_logprobs(case)[0].gather(1, case.targets.clamp(0, 388)[:, None]).squeeze(1)
        assert_logprobs_close(out["joint"], torch.where(ok, want, math.nan), "target log p")
