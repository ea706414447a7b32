"""Where a decode step's time goes: torch.profiler over the Engine's step at batch 1 and 32 (issue 22, item 1).

    python benchmarks/profile_step.py --out benchmarks/results/profile_step_cpu.json

A gpt2-small-shaped pair (base and Memory Decoder 12 x 768, vocabulary 50257, random weights, float32) in one
ModelStep, rows at position 96 of a 128-slot cache. Each batch size: 3 warm-up steps, then --steps profiled steps.
Reported per step: wall time, and self CPU time by op (matmuls by shape), the rest being Python and dispatch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import VOCAB, randomize, tokenizer
from provenance import git_commit

from memdec_fast.engine.step import ModelStep
from memdec_fast.models import GPT2, GPT2Config
from memdec_fast.models.pair import ModelPair

SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}


def profile_batch(step: ModelStep, rows: int, steps: int) -> dict:
    tokens, positions = [11] * rows, [96] * rows
    for _ in range(3):
        step.decode(tokens, positions)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step.decode(tokens, positions)
        wall = (time.perf_counter() - t) / steps
    by_op: dict[str, float] = defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        name = e.key if e.key not in ("aten::addmm", "aten::mm", "aten::linear") else f"{e.key} {e.input_shapes}"
        by_op[name] += e.self_cpu_time_total / steps / 1e3  # ms per step
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:25])
    return {"rows": rows, "wall_ms": wall * 1e3, "ops_ms": sum(by_op.values()), "top_self_ms": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    base, mem = (randomize(GPT2(GPT2Config(vocab_size=VOCAB, **SMALL))).eval().requires_grad_(False)
                 for _ in range(2))
    step = ModelStep(ModelPair(base, mem, tokenizer(VOCAB), lmbda=0.25), context=128, max_batch=32,
                     cuda_graphs=False)
    result = {"what": "issue 22: self CPU time per op of one Engine decode step", "pair": SMALL, "vocab": VOCAB,
              "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
              "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "batches": []}
    for rows in (1, 32):
        r = profile_batch(step, rows, args.steps)
        result["batches"].append(r)
        print(f"B={rows}: {r['wall_ms']:.1f} ms/step wall, {r['ops_ms']:.1f} ms in ops")
        for name, ms in list(r["top_self_ms"].items())[:12]:
            print(f"  {ms:8.2f} ms  {name}")
    result["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
