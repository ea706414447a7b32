"""The CUDA sample op's two kernels, timed one per process (MEMDEC_FAST_SAMPLER is read once), then compared.

    MEMDEC_FAST_SAMPLER=v1 python benchmarks/bench_sampler.py --out v1.json
    MEMDEC_FAST_SAMPLER=v2 python benchmarks/bench_sampler.py --out v2.json
    python benchmarks/bench_sampler.py --compare v1.json v2.json

Each case (B in {1, 8, 256}, V in {50257, 151936}, bf16, plain sampling and top-k + top-p) is timed with CUDA
events around single calls, L2 flushed before each, and reported as the median, beside the effective GB/s of the
logits read once. The tokens of a fixed seed are kept, so that --compare can count the rows where the kernels
disagree (allowed only where a draw or a cut lies within float32 rounding of a boundary: a few rows at most).
Without a GPU it writes {"skipped": ...} and exits 0 (gpu_check.sh --tiny on a CPU). benchmarks/NOTES.md, "The
sampler redesign", has the prediction these numbers are read against.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit, uptime

FILTERS = {"plain": (1.0, 0, 1.0, 0.0), "topk_topp": (0.8, 50, 0.9, 0.0)}  # temperature, top_k, top_p, min_p
LMBDA, KNN_TEMP, BASE_TEMP = 0.25, 1.0, 1.0


def cases(tiny: bool) -> list[tuple[int, int, str]]:
    """(B, V, filters) to time."""
    rows, vocabs = ((1, 8), (50257,)) if tiny else ((1, 8, 256), (50257, 151936))
    return [(b, v, f) for v in vocabs for b in rows for f in FILTERS]


def time_case(rows: int, vocab: int, filters: str, reps: int) -> dict:
    """Median microseconds of one call (CUDA events, cold L2), and the tokens of seed 0."""
    import memdec_fast  # noqa: F401  (loads memdec_fast._C, which registers the ops)

    g = torch.Generator(device="cuda").manual_seed(rows * vocab)
    base = torch.randn(rows, vocab, device="cuda", generator=g).mul_(3).bfloat16()
    mem = torch.randn(rows, vocab, device="cuda", generator=g).mul_(3).bfloat16()
    t, k, p, mp = FILTERS[filters]
    gen = torch.Generator(device="cuda")

    def call():
        return torch.ops.memdec_fast.sample(base, mem, None, LMBDA, KNN_TEMP, BASE_TEMP, t, k, p, mp, gen)

    gen.manual_seed(0)
    tokens = call()[0].tolist()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # larger than any L2
    for _ in range(3):
        call()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    us = statistics.median(times)
    read = 2 * rows * vocab * base.element_size()
    return {"rows": rows, "vocab": vocab, "filters": filters, "median_us": us, "min_us": min(times),
            "gb_per_s": read / us / 1e3, "tokens": tokens}


def run(out: Path, tiny: bool, reps: int) -> None:
    sampler = os.environ.get("MEMDEC_FAST_SAMPLER") or "v2"
    head = {"sampler": sampler, "git_commit": git_commit(), "uptime": uptime(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if not torch.cuda.is_available():
        out.write_text(json.dumps({**head, "skipped": "no GPU: nothing was timed"}, indent=1))
        print(f"bench_sampler: {sampler}: no GPU, nothing timed")
        return
    results = []
    for rows, vocab, filters in cases(tiny):
        r = time_case(rows, vocab, filters, reps)
        print(f"{sampler} B={rows:<4} V={vocab:<7} {filters:10} {r['median_us']:9.1f} us (min {r['min_us']:.1f}) "
              f"{r['gb_per_s']:7.1f} GB/s", flush=True)
        results.append(r)
    head["device"] = torch.cuda.get_device_name()
    out.write_text(json.dumps({**head, "results": results}, indent=1))


def compare(a_path: Path, b_path: Path) -> int:
    """A table of both samplers side by side, and the rows whose tokens differ."""
    a, b = (json.loads(p.read_text()) for p in (a_path, b_path))
    if "skipped" in a or "skipped" in b:
        print(f"bench_sampler: nothing to compare ({a.get('skipped') or b.get('skipped')})")
        return 0
    by_key = {(r["rows"], r["vocab"], r["filters"]): r for r in b["results"]}
    print(f"{'B':>4} {'V':>7} {'filters':10} {a['sampler'] + ' us':>10} {b['sampler'] + ' us':>10} {'speed-up':>8} "
          f"{'rows differing':>14}")
    for ra in a["results"]:
        rb = by_key.get((ra["rows"], ra["vocab"], ra["filters"]))
        if rb is None:
            continue
        differ = sum(x != y for x, y in zip(ra["tokens"], rb["tokens"], strict=True))
        print(f"{ra['rows']:>4} {ra['vocab']:>7} {ra['filters']:10} {ra['median_us']:10.1f} {rb['median_us']:10.1f} "
              f"{ra['median_us'] / rb['median_us']:8.2f} {differ:>7} of {ra['rows']}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the JSON to write (one sampler, the one MEMDEC_FAST_SAMPLER names)")
    parser.add_argument("--tiny", action="store_true", help="B in {1, 8} at V = 50257 only")
    parser.add_argument("--reps", type=int, default=50, help="timed calls per case")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("V1_JSON", "V2_JSON"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("--out or --compare is required")
    run(args.out, args.tiny, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
