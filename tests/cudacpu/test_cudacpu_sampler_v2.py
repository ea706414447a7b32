"""The v2 sampler (csrc/kernels/sample_split.cuh) where it differs from v1: rows split over blocks (three launches
through a workspace), 16-byte loads of aligned rows with a scalar tail, and its agreement with v1 on the same
Philox stream. test_cudacpu_kernels.py runs both samplers through the shared cases."""

from __future__ import annotations

import cudacpu_fixtures
import pytest
import torch
from cudacpu_harness import Case, run_case
from cudacpu_reference import rounding_picks, row_uniform
from test_cudacpu_kernels import ROWS, behaviour_case, check_sample, make_logits, reference_logprobs

driver, work = cudacpu_fixtures.driver, cudacpu_fixtures.work

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ALL_FILTERS = {"lmbda": 0.3, "temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.01}


def chunks_of(vocab: int, rows: int, max_blocks: int = 264) -> int:
    """Blocks per row that PlanSampleSplit (kernels/sample_split.cuh) chooses."""
    g = -(-vocab // 4096)
    return g if g > 1 and rows * g <= max_blocks else 1


@pytest.mark.parametrize("params", [
    ALL_FILTERS,
    {"lmbda": 0.5, "temperature": 1.0},
    {"lmbda": 0.2, "temperature": 0.7, "top_p": 0.5},
    {"lmbda": 0.6, "temperature": 1.1, "top_k": 1},
    {"lmbda": 0.4, "temperature": 0.0},
], ids=["all_filters", "plain", "top_p", "top_k1", "greedy"])
@pytest.mark.parametrize("base_dtype,mem_dtype", [(BF16, BF16), (F16, F32), (F32, BF16)],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_one_row_split_over_blocks(driver, work, base_dtype, mem_dtype, params):
    """B = 1 at GPT-2's vocabulary: the latency case, the row split over 13 blocks."""
    assert chunks_of(50257, 1) == 13
    base = make_logits(1, 50257, base_dtype, seed=21)
    mem = make_logits(1, 50257, mem_dtype, seed=22)
    check_sample(driver, work, Case("sample_v2", base, mem, params, seed=77, offset=4 * 3))


@pytest.mark.parametrize("vocab,pad", [(1, 3), (7, 0), (7, 5), (4096, 0), (4097, 0), (4097, 64 - 4097 % 64), (8193, 17)])
def test_odd_and_strided_vocabularies(driver, work, vocab, pad):
    """Vocabularies around a chunk boundary (the last chunk one token long), unaligned and padded strided rows
    (16-byte loads, or the scalar path), and V = 1 (the op refuses it, the kernel must not mind)."""
    params = {**ALL_FILTERS, "top_k": min(40, vocab - 1)}
    base = make_logits(3, vocab, F16, seed=vocab, pad=pad)
    mem = make_logits(3, vocab, F32, seed=vocab + 1, pad=pad)
    check_sample(driver, work, Case("sample_v2", base, mem, params, seed=vocab, offset=8))


@pytest.mark.parametrize("max_blocks", [264, 12], ids=["split", "one_block_a_row"])
def test_behaviour_rows_split_and_fused(driver, work, max_blocks):
    """The ROWS table (every filter, NaN / inf / -inf rows, the per-row parameter table) at V = 4097, with the row
    split in 2 chunks (the second one token long) and, when the blocks would overfill the GPU, one block a row."""
    case = behaviour_case("sample_v2", BF16, F32, 4097, seed=31, strided=True)
    case.max_blocks = max_blocks
    assert chunks_of(4097, len(ROWS), max_blocks) == (2 if max_blocks == 264 else 1)
    check_sample(driver, work, case)


@pytest.mark.parametrize("vocab,rows", [(1531, 12), (50257, 2)])
def test_same_tokens_as_v1(driver, work, vocab, rows):
    """v1 and v2 on the same Philox stream pick the same tokens, but where a draw or a cut lies within float32
    rounding of a boundary (then both picks must be among those rounding explains)."""
    if rows == len(ROWS):
        case = behaviour_case("sample", F32, BF16, vocab, seed=41, strided=False)
    else:
        case = Case("sample", make_logits(rows, vocab, BF16, seed=41), make_logits(rows, vocab, BF16, seed=42),
                    ALL_FILTERS, seed=5, offset=4)
    v1 = run_case(driver, case, work)["tokens"]
    case.kernel = "sample_v2"
    v2 = run_case(driver, case, work)["tokens"]
    differ = [r for r in range(rows) if v1[r] != v2[r]]
    logp = reference_logprobs(case)[0]
    params = case.row_params()
    for r in differ:
        row = {n: float(params[n][r]) for n in params}
        around = rounding_picks([logp[r]], row, row_uniform(case.seed, case.offset, r))
        assert {int(v1[r]), int(v2[r])} <= around, f"row {r}: v1 {int(v1[r])}, v2 {int(v2[r])}, rounding {around}"
    print(f"v1 and v2 differ on {len(differ)} of {rows} rows")
    assert len(differ) <= max(1, rows // 8)


@pytest.mark.sanitize
def test_sanitize_split(driver, work):
    """What sanitize.sh runs of the split path: the ROWS table over 2 chunks (strided f16 base, f32 memory)."""
    case = behaviour_case("sample_v2", F16, F32, 4100, seed=51, strided=True)
    assert chunks_of(4100, len(ROWS)) == 2
    check_sample(driver, work, case)
