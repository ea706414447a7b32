"""Serving load: the continuous-batching engine at concurrency 1, 8, 32, 64 vs the same requests one at a time.

    python benchmarks/bench_serve.py --out benchmarks/results/serve_cpu.json   # gpt2-small-shaped pair, CPU
    python benchmarks/bench_serve.py --quick --out /tmp/serve_quick.json      # tiny pair: a smoke run
    python benchmarks/bench_serve.py --memories 3 --out benchmarks/results/serve_memories_cpu.json  # many memories

What it drives: the engine directly, through ``Engine.stream`` (the path the HTTP server consumes for every
request), without HTTP and JSON; it measures the engine, not the server's overhead.

Load: a fixed-seed list of requests (token-id prompts of uniform random length, uniform random max_tokens),
greedy. Concurrency c runs the first max(min_requests, 2c) requests of the list (at most all of it) with c
closed-loop workers: each sends its next request as soon as its previous one ends. For each level: output
tokens/s over the level's wall time (prefill included), time to first token (from the request's send to its
first token) and time between tokens (each gap between consecutive tokens of a request), p50 and p99.
Baseline, in the same run: the requests of concurrency 1 sent one at a time through ``JointGenerator.generate``.
With several --dtype values, all of it runs once per dtype; the top-level "targets" are the first run's.
--device defaults to cuda when available (benchmarks/gpu_check.sh runs it there), else cpu.

--memories N (N >= 2): many memories over one base, instead of the levels above. N Memory Decoders of one shape
(seeds 1..N); at each concurrency (default 32) the requests run on an engine of the first memory alone, then on
one engine of all N with request i asking for memory i mod N, then on the single-memory engine again (the two
single runs bracket the machine's drift). Then the resident memory (VmRSS after loading and one request) of one
N-memory engine process against N single-memory engine processes, each a fresh interpreter. No JointGenerator
baseline in this mode.

Pair: random gpt2-small-shaped base (12 x 768, 12 heads) and Memory Decoder of the same shape, GPT-2's 50257
tokens, a 256-position context (the longest request needs 64 + 40), saved with save_pretrained to a temporary
directory; a word-level tokenizer without EOS, so every request runs to its max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import memdec_fast  # noqa: F401  (the installed package, with its compiled extension, when there is one)
except ImportError:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py, also when loaded by file path
from provenance import git_commit, uptime

from memdec_fast import JointGenerator
from memdec_fast.engine import Engine

VOCAB = 50257
LMBDA, KNN_TEMP = 0.25, 1.0
FULL = {"dims": {"n_embd": 768, "n_layer": 12, "n_head": 12}, "requests": 64, "min_requests": 8,
        "concurrency": [1, 8, 32, 64], "prompt_tokens": (16, 64), "new_tokens": (8, 40)}
QUICK = {"dims": {"n_embd": 32, "n_layer": 2, "n_head": 4}, "requests": 8, "min_requests": 2,
         "concurrency": [1, 4], "prompt_tokens": (4, 16), "new_tokens": (2, 8)}
CONTEXT = 256


def dirty_files() -> list[str]:
    """Tracked files with uncommitted changes (the run measured them, not git_commit's version)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted(line[3:] for line in out.splitlines() if line.strip())


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def build_pair(root: Path, dims: dict, memory_dims: dict | None = None, memories: int = 1) -> tuple[Path, Path, object]:
    """Random GPT-2 base and Memory Decoder (of the base's shape unless memory_dims), saved; and their word-level
    tokenizer, saved with the base. memories > 1: also memory2 ... memory<N> beside them (seeds 2..N)."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(
        models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")))
    paths = []
    extra = [(f"memory{i}", i, memory_dims or dims) for i in range(2, memories + 1)]
    for name, seed, shape in (("base", 0, dims), ("memory", 1, memory_dims or dims), *extra):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, **shape)).eval()
        model.save_pretrained(root / name)
        paths.append(root / name)
        del model
    tok.save_pretrained(root / "base")
    return paths[0], paths[1], tok


def request_mix(n: int, seed: int, prompt_tokens: tuple[int, int], new_tokens: tuple[int, int]) -> list[dict]:
    """n requests: token-id prompts of uniform length in prompt_tokens, max_new_tokens uniform in new_tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*prompt_tokens)
        out.append({"prompt": [rng.randrange(VOCAB) for _ in range(length)],
                    "max_new_tokens": rng.randint(*new_tokens)})
    return out


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1e3, 2) if xs else None


async def closed_loop(deltas, reqs: list[dict], concurrency: int) -> dict:
    """The requests with `concurrency` closed-loop workers; deltas(request) is an async iterator of the number of
    tokens each streamed delta brings (greedy, up to the request's max_new_tokens). Throughput and percentiles."""
    todo = list(reversed(reqs))
    ttft, itl, e2e, tokens = [], [], [], 0

    async def worker() -> None:
        nonlocal tokens
        while todo:
            r = todo.pop()
            t0 = time.perf_counter()
            last = None
            async for n in deltas(r):
                if not n:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.extend([(now - last) / n] * n)
                last, tokens = now, tokens + n
            e2e.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    seconds = time.perf_counter() - start
    return {
        "concurrency": concurrency, "requests": len(reqs), "output_tokens": tokens, "seconds": round(seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 2),
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
        "e2e_ms": {"p50": pct(e2e, 50), "p99": pct(e2e, 99)},
        "load_after": load_average(),
    }


async def run_level(engine: Engine, reqs: list[dict], concurrency: int) -> dict:
    """The requests through engine.stream with `concurrency` closed-loop workers."""

    async def deltas(r: dict):
        memory = {"memory": r["memory"]} if "memory" in r else {}
        async for d in engine.stream(r["prompt"], max_new_tokens=r["max_new_tokens"], temperature=0.0, **memory):
            yield len(d.token_ids)

    return await closed_loop(deltas, reqs, concurrency)


def engine_levels(engine: Engine, reqs: list[dict], counts: dict[int, int], label: str) -> list[dict]:
    """run_level at each concurrency c of `counts`, over its first counts[c] requests, logged as it goes."""
    levels = []
    for c, n in counts.items():
        print(f"{label}: {n} requests at concurrency {c}", file=sys.stderr)
        levels.append(asyncio.run(run_level(engine, reqs[:n], c)))
        print(json.dumps(levels[-1]), file=sys.stderr)
    return levels


def run_baseline(gen: JointGenerator, reqs: list[dict]) -> dict:
    """The requests one at a time through JointGenerator.generate."""
    lat, tokens = [], 0
    start = time.perf_counter()
    for r in reqs:
        t0 = time.perf_counter()
        res = gen.generate(r["prompt"], max_new_tokens=r["max_new_tokens"])
        lat.append(time.perf_counter() - t0)
        tokens += len(res.token_ids[0])
    seconds = time.perf_counter() - start
    return {"requests": len(reqs), "output_tokens": tokens, "seconds": round(seconds, 3),
            "output_tokens_per_s": round(tokens / seconds, 2), "ms_per_token": round(seconds / tokens * 1e3, 2),
            "e2e_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99)}, "load_after": load_average()}


def targets(levels: list[dict], baseline: dict) -> dict:
    """The issue's CPU targets at concurrency 32 (or the highest level below it, in a quick run)."""
    by_c = {lv["concurrency"]: lv for lv in levels}
    c = 32 if 32 in by_c else max(by_c)
    step1 = by_c[1]["itl_ms"]["p50"] if 1 in by_c else None
    speedup = by_c[c]["output_tokens_per_s"] / baseline["output_tokens_per_s"]
    itl_ratio = by_c[c]["itl_ms"]["p99"] / step1 if step1 else None
    # the batching alone: the same engine at concurrency 1 (the baseline also differs in its decode path)
    vs_c1 = by_c[c]["output_tokens_per_s"] / by_c[1]["output_tokens_per_s"] if 1 in by_c else None
    return {"concurrency": c, "batch1_step_ms": step1,
            "tokens_per_s_vs_one_at_a_time": round(speedup, 2), "tokens_per_s_target": 6.0,
            "tokens_per_s_vs_engine_c1": None if vs_c1 is None else round(vs_c1, 2),
            "tokens_per_s_met": speedup >= 6.0,
            "p99_itl_vs_batch1_step": None if itl_ratio is None else round(itl_ratio, 2), "p99_itl_target": 3.0,
            "p99_itl_met": None if itl_ratio is None else itl_ratio <= 3.0}


def plot(result: dict, path: Path) -> None:
    """Throughput against p50/p99 latency, one point per concurrency, per dtype; one-at-a-time as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = ("tab:blue", "tab:orange", "tab:green")
    for run, color in zip(result["runs"], colors):
        levels, base, dt = run["levels"], run["baseline"], run["dtype"]
        x = [lv["output_tokens_per_s"] for lv in levels]
        for ax, key in ((axes[0], "itl_ms"), (axes[1], "ttft_ms")):
            for q, style in (("p50", "o-"), ("p99", "s--")):
                ax.plot(x, [lv[key][q] for lv in levels], style, color=color, label=f"engine {dt}, {q}")
            for lv in levels:
                ax.annotate(f"c={lv['concurrency']}", (lv["output_tokens_per_s"], lv[key]["p99"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
            ax.axvline(base["output_tokens_per_s"], color=color, ls=":",
                       label=f"one at a time, generate, {dt}: {base['output_tokens_per_s']:.1f} tok/s")
        axes[0].plot([base["output_tokens_per_s"]], [base["ms_per_token"]], "^", color=color,
                     label=f"one at a time, {dt}: ms per token (prefill incl.)")
    for ax, title in ((axes[0], "time between tokens"), (axes[1], "time to first token")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"bench_serve: {result['pair']}, {result['device']} ({result['threads']} threads), "
                 f"{result['date'][:10]}, {result['git_commit'][:7]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memories(result: dict, path: Path) -> None:
    """--memories: output tokens/s of one memory (before, after) and of N, per concurrency; and the RSS of one
    N-memory engine against N single-memory ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["runs"][0]
    n, levels = run["memories"], run["levels"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"one": "one memory (before)", "many": f"{n} memories", "one_again": "one memory (after)"}
    width = 0.8 / len(labels)
    for j, (key, label) in enumerate(labels.items()):
        xs = [i + (j - 1) * width for i in range(len(levels[key]))]
        axes[0].bar(xs, [lv["output_tokens_per_s"] for lv in levels[key]], width, label=label)
    axes[0].set_xticks(range(len(levels["one"])), [f"c={lv['concurrency']}" for lv in levels["one"]])
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title(f"{n} memories vs one: " + ", ".join(f"c={c}: {r}x" for c, r in
                                                           run["tokens_per_s_many_vs_one"].items()))
    axes[0].legend(fontsize=7)
    rss = run["rss"]
    singles = [r["rss_mb"] for r in rss["single_memory_mb"]]
    axes[1].bar([0], [rss["many_memories_mb"]["rss_mb"]], 0.6, label=f"one engine, {n} memories")
    bottom = 0.0
    for i, mb in enumerate(singles):
        axes[1].bar([1], [mb], 0.6, bottom=bottom, label="single-memory engines" if i == 0 else None,
                    color="tab:orange", edgecolor="white")
        bottom += mb
    axes[1].set_xticks([0, 1], [f"1 x {n} memories", f"{n} x 1 memory"])
    axes[1].set_ylabel("resident memory (MB)")
    axes[1].set_title(f"RSS: {rss['ratio']}x")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"bench_serve --memories {n}: {result['pair']}, {result['device']} ({result['threads']} threads), "
                 f"{result['date'][:10]}, {result['git_commit'][:7]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_dtype(base: Path, memory: Path, tok, device: str, dtype: str, reqs: list[dict], counts: dict[int, int],
              prefill_chunk: int | None, prefill_steps: float | None = None) -> dict:
    """Baseline and every concurrency level, for one dtype."""
    kw = {"lmbda": LMBDA, "knn_temp": KNN_TEMP, "device": device, "dtype": getattr(torch, dtype), "tokenizer": tok}
    gen = JointGenerator.from_pretrained(base, memory, **kw)
    gen.generate(reqs[0]["prompt"][:8], max_new_tokens=2)  # warm-up
    n_base = counts[min(counts)]
    print(f"{dtype} baseline: {n_base} requests one at a time through JointGenerator.generate", file=sys.stderr)
    baseline = run_baseline(gen, reqs[:n_base])
    print(json.dumps(baseline), file=sys.stderr)
    del gen
    extra = {k: v for k, v in (("prefill_chunk", prefill_chunk), ("prefill_steps", prefill_steps)) if v is not None}
    engine = Engine.from_pretrained(base, memory, max_batch=max(counts), max_queue=len(reqs), **kw, **extra)
    try:
        engine.submit(reqs[0]["prompt"][:8], max_new_tokens=2).result()  # warm-up
        levels = engine_levels(engine, reqs, counts, f"{dtype} engine")
    finally:
        engine.close(timeout=0)
    return {"dtype": dtype, "engine": {"max_batch": engine.max_batch, "max_queue": engine.max_queue,
                                       "prefill_chunk": engine.prefill_chunk, "prefill_steps": prefill_steps},
            "baseline": baseline, "levels": levels, "targets": targets(levels, baseline)}


def run_memories(base: Path, memories: list[Path], device: str, dtype: str, reqs: list[dict], counts: dict[int, int],
                 prefill_chunk: int | None) -> dict:
    """One memory, then N over one base (request i asks for memory i mod N), then one again; and the RSS."""
    kw = {"lmbda": LMBDA, "knn_temp": KNN_TEMP, "device": device, "dtype": getattr(torch, dtype),
          "max_batch": max(counts), "max_queue": len(reqs)} | ({} if prefill_chunk is None else
                                                              {"prefill_chunk": prefill_chunk})
    names = [f"m{i}" for i in range(len(memories))]
    spread = [r | {"memory": names[i % len(names)]} for i, r in enumerate(reqs)]
    runs = {}
    for label, load, mix in (("one", lambda: Engine.from_pretrained(base, memories[0], **kw), reqs),
                             ("many", lambda: Engine.from_pretrained(base, memories=dict(zip(names, memories)), **kw),
                              spread),
                             ("one_again", lambda: Engine.from_pretrained(base, memories[0], **kw), reqs)):
        engine = load()
        try:
            engine.submit(reqs[0]["prompt"][:8], max_new_tokens=2, **({"memory": names[0]} if mix is spread else {})
                          ).result()  # warm-up
            runs[label] = engine_levels(engine, mix, counts, f"{dtype} {label} ({len(memories)} memories)"
                                        if label == "many" else f"{dtype} {label} memory")
        finally:
            engine.close(timeout=0)
    ratios = {}
    for i, c in enumerate(counts):
        single = (runs["one"][i]["output_tokens_per_s"] + runs["one_again"][i]["output_tokens_per_s"]) / 2
        ratios[str(c)] = round(runs["many"][i]["output_tokens_per_s"] / single, 3)
    probe = {"device": device, "dtype": dtype, "max_batch": max(counts), "lmbda": LMBDA, "knn_temp": KNN_TEMP}
    many_rss = rss_probe(probe | {"base": str(base), "memories": {n: str(m) for n, m in zip(names, memories)}})
    single_rss = [rss_probe(probe | {"base": str(base), "memory": str(m)}) for m in memories]
    rss_ratio = many_rss["rss_mb"] / sum(r["rss_mb"] for r in single_rss)
    c = 32 if 32 in counts else max(counts)
    return {"dtype": dtype, "memories": len(memories), "levels": runs, "tokens_per_s_many_vs_one": ratios,
            "rss": {"many_memories_mb": many_rss, "single_memory_mb": single_rss, "ratio": round(rss_ratio, 3)},
            "targets": {"concurrency": c, "tokens_per_s_many_vs_one": ratios[str(c)], "tokens_per_s_target": 0.8,
                        "tokens_per_s_met": ratios[str(c)] >= 0.8, "rss_ratio": round(rss_ratio, 3),
                        "rss_target": 0.55, "rss_met": rss_ratio <= 0.55}}


def rss_probe(spec: dict) -> dict:
    """The resident memory of a fresh process that loads the engine of `spec` and serves one request (MB)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-probe", json.dumps(spec)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_child(spec: dict) -> None:
    """--rss-probe: load, serve one request, print VmRSS and VmHWM (MB) as JSON."""
    spec = dict(spec)
    base, max_batch = spec.pop("base"), spec.pop("max_batch")
    spec["dtype"] = getattr(torch, spec["dtype"])
    engine = Engine.from_pretrained(base, max_batch=max_batch, **spec)
    first = {"memory": next(iter(spec["memories"]))} if "memories" in spec else {}
    engine.submit([1, 2, 3, 4], max_new_tokens=2, **first).result()
    engine.close()
    with open("/proc/self/status") as f:
        status = {k: v.split()[0] for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
    print(json.dumps({"rss_mb": round(int(status["VmRSS"]) / 1024, 1), "hwm_mb": round(int(status["VmHWM"]) / 1024, 1)}))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny pair and few requests: a smoke run")
    p.add_argument("--out", type=Path, help="write the JSON here (and the PNG beside it, same stem)")
    p.add_argument("--requests", type=int, help="length of the request list (the most any level runs)")
    p.add_argument("--min-requests", type=int, help="requests of the smallest levels (and of the baseline)")
    p.add_argument("--concurrency", type=int, nargs="+")
    p.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16"), default=["float32"],
                   help="one run per dtype; the first one's targets are the headline")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--prefill-chunk", type=int, help="the engine's prefill chunk (default: the engine's)")
    p.add_argument("--prefill-steps", type=float, help="the engine's prefill_steps (default: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memories", type=int,
                   help="N >= 2: one Memory Decoder against N over one base, and their RSS (see the docstring)")
    p.add_argument("--rss-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_probe:
        _rss_child(json.loads(args.rss_probe))
        return {}
    if args.memories is not None and args.memories < 2:
        p.error(f"--memories: expected N >= 2, got {args.memories}")
    cfg = QUICK if args.quick else FULL
    if args.memories and not args.concurrency:
        args.concurrency = [max(cfg["concurrency"][-1] // 2, 4)] if args.quick else [32]
    n = args.requests or cfg["requests"]
    low = min(n, args.min_requests or cfg["min_requests"])
    counts = {c: min(n, max(low, 2 * c)) for c in sorted(args.concurrency or cfg["concurrency"])}
    reqs = request_mix(n, args.seed, cfg["prompt_tokens"], cfg["new_tokens"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load_start, uptime_start, commit = load_average(), uptime(), git_commit()  # the code measured is HEAD at the start
    with tempfile.TemporaryDirectory() as tmp:
        base, memory, tok = build_pair(Path(tmp), cfg["dims"], memories=args.memories or 1)
        if args.memories:
            mems = [memory] + [memory.with_name(f"memory{i}") for i in range(2, args.memories + 1)]
            runs = [run_memories(base, mems, device, dt, reqs, counts, args.prefill_chunk) for dt in args.dtype]
        else:
            runs = [run_dtype(base, memory, tok, device, dt, reqs, counts, args.prefill_chunk, args.prefill_steps)
                    for dt in args.dtype]
    result = {
        "benchmark": "bench_serve", "driven": "engine directly (Engine.stream), no HTTP",
        "pair": ("tiny random pair" if args.quick else "gpt2-small-shaped random base + Memory Decoder (12x768 each)")
        + f", vocab {VOCAB}, context {CONTEXT}",
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty_files(), "uptime_start": uptime_start, "uptime_end": uptime(),
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_average_start": load_start, "load_average_end": load_average(), "lmbda": LMBDA, "knn_temp": KNN_TEMP,
        "mix": {"seed": args.seed, "requests": n, "per_concurrency": {str(c): k for c, k in counts.items()},
                "prompt_tokens": list(cfg["prompt_tokens"]), "new_tokens": list(cfg["new_tokens"]), "greedy": True},
        "runs": runs,
        "targets": {"dtype": runs[0]["dtype"], **runs[0]["targets"]},  # the headline run's
    }
    by_dtype = {run["dtype"]: run for run in runs if "levels" in run and isinstance(run["levels"], list)}
    if {"float32", "bfloat16"} <= set(by_dtype):  # issue 22: bfloat16 at least 1.5x float32 at concurrency 32
        c = result["targets"]["concurrency"]
        rate = {dt: next(lv["output_tokens_per_s"] for lv in by_dtype[dt]["levels"] if lv["concurrency"] == c)
                for dt in ("float32", "bfloat16")}
        ratio = rate["bfloat16"] / rate["float32"]
        result["targets"] |= {"bfloat16_over_float32": round(ratio, 2), "bfloat16_target": 1.5,
                              "bfloat16_met": ratio >= 1.5}
    if args.memories:
        result["mode"] = f"--memories {args.memories}: one Memory Decoder vs {args.memories} over one base"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        try:
            (plot_memories if args.memories else plot)(result, args.out.with_suffix(".png"))
        except ImportError:  # the `bench` extra: the JSON is the record, the picture a convenience
            print("bench_serve: matplotlib is not installed, so no PNG was drawn (pip install '.[bench]')")
    for run in runs:
        print(run["dtype"], json.dumps(run["targets"]))
    return result


if __name__ == "__main__":
    main()
