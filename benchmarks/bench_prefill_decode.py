"""A prefill and a decode step in one forward against the two apart (issue 22): one step, then the Engine.

    python benchmarks/bench_prefill_decode.py --out benchmarks/results/prefill_decode_cpu.json

Step: a gpt2-small-shaped pair (base and Memory Decoder 12 x 768, vocabulary 50257, random weights, float32) in one
ModelStep of 32 slots, every row at position 96; a step of the other rows' decode plus 1-4 prompt chunks of 16-50
tokens, timed as ``decode`` + ``prefill`` and as one ``prefill_decode`` (median of 7 after one warm-up).

Engine: bench_serve's request mix (64 requests, greedy, concurrency 32, then 16 requests at 8), alternating the
Engine's steps apart (its fallback path, ``Engine._prefill_decode`` answering False) and together, --rounds times on
one engine, so that drift of the machine falls on both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve
from provenance import git_commit, uptime

from memdec_fast import JointGenerator
from memdec_fast.engine import Engine
from memdec_fast.engine.step import ModelStep

CASES = ((1, 16), (1, 40), (2, 40), (4, 50))
"""(prompt chunks, tokens each) beside the other rows' decode."""


def median_ms(fn, n: int = 7) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def step_cases(gen: JointGenerator) -> list[dict]:
    """decode + prefill apart against prefill_decode, per case of CASES."""
    step = ModelStep(gen.pair, context=256, max_batch=32, cuda_graphs=False)
    step.set_params(0, {"temperature": 0.0}, rows=32)
    at = 96
    g = torch.Generator().manual_seed(0)
    step.prefill([(s, torch.randint(0, 1000, (at,), generator=g).tolist(), 0) for s in range(32)])
    out = []
    for chunks, length in CASES:
        rows = 32 - chunks
        plan = [(s, torch.randint(0, 1000, (length,), generator=g).tolist(), at) for s in range(rows, 32)]
        tokens, positions = [7] * 32, [at] * 32
        decode = median_ms(lambda t=tokens[:rows], p=positions[:rows]: step.decode(t, p))
        prefill = median_ms(lambda c=plan: step.prefill(c))
        together = median_ms(lambda c=plan, t=tokens, p=positions: step.prefill_decode(c, t, p))
        out.append({"decode_rows": rows, "chunks": chunks, "chunk_tokens": length, "decode_ms": round(decode, 1),
                    "prefill_ms": round(prefill, 1), "apart_ms": round(decode + prefill, 1),
                    "one_forward_ms": round(together, 1)})
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def engine_rounds(gen: JointGenerator, rounds: int) -> list[dict]:
    """Alternating runs of the Engine with its steps apart and together."""
    together = Engine._prefill_decode
    reqs = bench_serve.request_mix(64, 0, bench_serve.FULL["prompt_tokens"], bench_serve.FULL["new_tokens"])
    out = []
    try:
        with Engine(gen, max_batch=32) as engine:
            asyncio.run(bench_serve.run_level(engine, reqs[:8], 8))  # warm-up
            for r in range(rounds):
                for mode in ("apart", "together"):
                    Engine._prefill_decode = together if mode == "together" else (lambda *_: False)
                    for c, n in ((32, 64), (8, 16)):
                        level = asyncio.run(bench_serve.run_level(engine, reqs[:n], c))
                        out.append({"round": r, "steps": mode, **level})
                        print(json.dumps(out[-1]), file=sys.stderr)
    finally:
        Engine._prefill_decode = together
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, memory, tok = bench_serve.build_pair(Path(tmp), bench_serve.FULL["dims"])
        gen = JointGenerator.from_pretrained(base, memory, lmbda=bench_serve.LMBDA, knn_temp=bench_serve.KNN_TEMP,
                                             tokenizer=tok)
    result = {"what": "issue 22: prefill and decode in one forward against apart", "dtype": "float32",
              "pair": bench_serve.FULL["dims"], "vocab": bench_serve.VOCAB, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "uptime_start": uptime(), "step": step_cases(gen), "engine": engine_rounds(gen, args.rounds),
              "load_average_end": os.getloadavg()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
