"""Engine throughput against JointGenerator, on a model pair from disk (default: the bundled demo pair).

    python benchmarks/bench_engine.py --requests 32 --max-batch 16
    python benchmarks/bench_engine.py --base gpt2-xl --memory path/to/memory --device cuda --out results/engine.json

Greedy requests with prompts of 4..40 tokens and max_new_tokens drawn from 8..64 (fixed seed), so
that rows finish at different steps. Variants, each timed over all requests after one warm-up:
  sequential    JointGenerator.generate, one request at a time
  static_batch  JointGenerator.generate over all requests at once (left-padded; finished rows leave
                the batch only once half of it has finished)
  engine        Engine.submit of all requests at once (max_batch slots; the rest wait)
Each time is the median of --repeats runs. Every variant must return the same tokens; the script checks it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import memdec_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

from memdec_fast import JointGenerator
from memdec_fast.engine import Engine

DEMO = ROOT / "memdec_fast" / "data" / "demo"


def requests(tokenizer, n: int, context: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    words = (DEMO / "domain_heldout.txt").read_text().split()
    out = []
    for _ in range(n):
        start = rng.randrange(len(words) - 60)
        ids = tokenizer.encode(" ".join(words[start : start + 40]))[: rng.randint(4, 40)]
        out.append((ids, min(rng.randint(8, 64), context - len(ids) + 1)))
    return out


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(DEMO / "base"))
    ap.add_argument("--memory", default=str(DEMO / "memory"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    gen = JointGenerator.from_pretrained(args.base, args.memory, device=args.device, cuda_graphs=False)
    engine = Engine(JointGenerator.from_pretrained(args.base, args.memory, device=args.device, cuda_graphs=False),
                    max_batch=args.max_batch, prefill_chunk=args.prefill_chunk)
    reqs = requests(gen.tokenizer, args.requests, engine.max_context)
    total = sum(n for _, n in reqs)

    def sequential():
        return [gen.generate(ids, max_new_tokens=n).token_ids[0] for ids, n in reqs]

    def static_batch():
        # one max_new_tokens for the batch: the longest; each row is cut to its own afterwards
        res = gen.generate([ids for ids, _ in reqs], max_new_tokens=max(n for _, n in reqs))
        return [t[:n] for t, (_, n) in zip(res.token_ids, reqs)]

    def served():
        futs = [engine.submit(ids, max_new_tokens=n) for ids, n in reqs]
        return [f.result().token_ids for f in futs]

    results, outputs = {}, {}
    for name, fn in (("sequential", sequential), ("static_batch", static_batch), ("engine", served)):
        fn()  # warm-up
        runs = [timed(fn) for _ in range(args.repeats)]
        seconds, outputs[name] = statistics.median(t for t, _ in runs), runs[0][1]
        results[name] = {"seconds": round(seconds, 4), "tokens_per_s": round(total / seconds, 1)}
        print(f"{name:>13}: {seconds:7.3f} s  {total / seconds:9.1f} tokens/s")
    stopped_early = [i for i, t in enumerate(outputs["sequential"]) if len(t) < reqs[i][1]]  # EOS: static is longer
    for name in ("static_batch", "engine"):
        same = [a == b[: len(a)] for a, b in zip(outputs["sequential"], outputs[name])]
        assert all(same), f"{name}: tokens differ from sequential in requests {[i for i, s in enumerate(same) if not s]}"
    engine.close()
    info = {"device": str(gen.device), "torch": torch.__version__, "platform": platform.platform(),
            "requests": args.requests, "max_batch": args.max_batch, "new_tokens": total,
            "stopped_early": len(stopped_early), "results": results, "engine_stats": engine.stats}
    print(json.dumps(info, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
