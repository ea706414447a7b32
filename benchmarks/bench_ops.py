"""Each compiled op against its reference, eager and under torch.compile.

    pytest benchmarks/bench_ops.py --benchmark-json benchmarks/results/ops_<device>.json

Sizes: B in {1, 8, 64, 256}, V in {50257, 151936}; logits in bfloat16 (the
decode path's dtype). The GB/s the op must read is B * V * 2 bytes * 2 models.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES

from memdec_fast import ops, reference

pytestmark = pytest.mark.skipif(not ops.compiled_available(), reason="compiled extension not built")

SIZES = [(b, v) for v in (50257, 151936) for b in (1, 8, 64, 256)]
OPS = {
    "sample": lambda impl, b, m, t: impl.sample(b, m, 0.3, temperature=0.8, top_k=50, top_p=0.9),
    "sample_greedy": lambda impl, b, m, t: impl.sample(b, m, 0.3, temperature=0.0),
    "joint_logprobs": lambda impl, b, m, t: impl.joint_logprobs(b, m, 0.3),
    "target_logprobs": lambda impl, b, m, t: impl.target_logprobs(b, m, t, 0.3),
}
_COMPILED_REFERENCE = {}


def compiled_reference(name: str):
    if name not in _COMPILED_REFERENCE:
        fn = OPS[name]
        _COMPILED_REFERENCE[name] = torch.compile(lambda b, m, t: fn(reference, b, m, t), dynamic=True)
    return _COMPILED_REFERENCE[name]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,vocab", SIZES, ids=[f"B{b}-V{v}" for b, v in SIZES])
@pytest.mark.parametrize("impl", ["compiled", "reference", "reference_compile"])
@pytest.mark.parametrize("op", list(OPS))
def test_op(timed, benchmark, op, impl, rows, vocab, device):
    if device == "cpu" and impl != "compiled" and rows * vocab > 8 * 50257:
        pytest.skip("the float64 reference takes seconds a call at this size on the CPU")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, vocab, generator=g).to(device, torch.bfloat16)
    mem = torch.randn(rows, vocab, generator=g).to(device, torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
    fn = {"compiled": lambda b, m, t: OPS[op](ops, b, m, t),
          "reference": lambda b, m, t: OPS[op](reference, b, m, t),
          "reference_compile": compiled_reference(op)}[impl]
    benchmark.group = f"{op} {device} B={rows} V={vocab}"
    benchmark.extra_info.update(op=op, impl=impl, rows=rows, vocab=vocab, device=device,
                                bytes_read=rows * vocab * 2 * 2)
    timed(fn, base, mem, targets, device=device, rounds=10 if impl == "compiled" else 3)


# --- User-style float32 baselines (issue 13): what a user would write in PyTorch, side by side with our op.
#
#     pytest benchmarks/bench_ops.py -k user_baseline --benchmark-json benchmarks/results/ops_cpu_vec.json
LMBDA = 0.3


def user_mixture(b: torch.Tensor, m: torch.Tensor, lmbda: float = LMBDA) -> torch.Tensor:
    """log p of the mixture as a user writes it: two log_softmax and a logaddexp, in float32."""
    # b, m: [B, V]
    return torch.logaddexp(torch.log_softmax(b.float(), -1) + math.log1p(-lmbda),
                           torch.log_softmax(m.float(), -1) + math.log(lmbda))


def user_sample(b: torch.Tensor, m: torch.Tensor, temperature: float = 0.8, top_k: int = 50,
                top_p: float = 0.9) -> torch.Tensor:
    """Hugging Face's Temperature, TopK and TopP warpers on the mixture, then torch.multinomial."""
    scores = user_mixture(b, m) / temperature
    kth = torch.topk(scores, top_k)[0][..., -1, None]
    scores = scores.masked_fill(scores < kth, -float("inf"))
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    scores = scores.masked_fill(remove, -float("inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)


def user_target_logprobs(b: torch.Tensor, m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return user_mixture(b, m).gather(1, t[:, None]).squeeze(1)


USER_OPS = {
    # op: (our call, {baseline name: user-style call})
    "sample": (OPS["sample"], {"user_eager": lambda b, m, t: user_sample(b, m)}),
    "joint_logprobs": (OPS["joint_logprobs"], {"user_eager": lambda b, m, t: user_mixture(b, m),
                                               "user_compile": "compile"}),
    "target_logprobs": (OPS["target_logprobs"], {"user_eager": user_target_logprobs,
                                                 "user_compile": "compile"}),
}
_USER_COMPILED = {}


def user_fn(op: str, impl: str):
    ours, baselines = USER_OPS[op]
    if impl in ("ours", "ours_1thread"):
        return lambda b, m, t: ours(ops, b, m, t)
    if baselines[impl] != "compile":
        return baselines[impl]
    if op not in _USER_COMPILED:
        _USER_COMPILED[op] = torch.compile(baselines["user_eager"])
    return _USER_COMPILED[op]


USER_CASES = [(op, impl) for op, (_, baselines) in USER_OPS.items() for impl in ("ours", "ours_1thread", *baselines)]


@pytest.mark.parametrize("op,impl", USER_CASES, ids=[f"{op}-{impl}" for op, impl in USER_CASES])
def test_user_baseline(timed, benchmark, op, impl):
    """B=1, V=50257, float32 logits on the CPU: our op and the user-style baselines, in one run."""
    rows, vocab = 1, 50257
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, vocab, generator=g) * 3
    mem = torch.randn(rows, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    benchmark.group = f"user_baseline {op} cpu B={rows} V={vocab} float32"
    benchmark.extra_info.update(op=op, impl=impl, rows=rows, vocab=vocab, device="cpu", dtype="float32",
                                bytes_read=rows * vocab * 4 * 2)
    threads = torch.get_num_threads()
    if impl == "ours_1thread":  # the row not split: what a busy machine's other core cannot spoil
        torch.set_num_threads(1)
    try:
        timed(user_fn(op, impl), base, mem, targets, rounds=200)
    finally:
        torch.set_num_threads(threads)
