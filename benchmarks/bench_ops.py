"""Each compiled op against its reference, eager and under torch.compile.

    pytest benchmarks/bench_ops.py --benchmark-json benchmarks/results/ops_<device>.json

Sizes: B in {1, 8, 64, 256}, V in {50257, 151936}; logits in bfloat16 (the
decode path's dtype). The GB/s the op must read is B * V * 2 bytes * 2 models.
"""

from __future__ import annotations

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
