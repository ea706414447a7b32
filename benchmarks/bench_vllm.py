"""memdec_fast's Engine against vLLM with the memdec_fast plugin: the same pair, requests and metrics, in one run.

    python benchmarks/bench_vllm.py --pair xl --out benchmarks/results/vllm_vs_engine_gpu.json   # GPU: gpt2-xl + gpt2
    python benchmarks/bench_vllm.py --pair small --out benchmarks/results/vllm_vs_engine_cpu.json
    python benchmarks/bench_vllm.py --pair tiny                                                   # a smoke run

Runs where vLLM and memdec_fast are both installed (on the CPU: tests/vllm/run.sh's .venv-vllm). Pairs, random
weights of real shapes saved with save_pretrained (no downloads): "xl" is a gpt2-xl-shaped base (48 x 1600, 25
heads) with a gpt2-shaped Memory Decoder (12 x 768); "small" is gpt2-shaped twice; "tiny" a 2-layer pair. GPT-2's
50257 tokens, a word-level tokenizer without EOS, so every request runs to its max_tokens.

Load, metrics and levels are bench_serve.py's (its request mix, closed-loop workers, greedy): output tokens/s,
time to first token and time between tokens, p50 and p99, at each concurrency (default 1 and 32). memdec_fast's
side is ``Engine.stream``; vLLM's is ``AsyncLLM.generate`` with delta outputs, the path its OpenAI server uses.
Each system runs alone: the Engine is closed before vLLM starts. The first request's greedy tokens of the two are
compared (equal in float32; bf16 may round differently).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve.py and provenance.py
from bench_serve import (
    CONTEXT,
    KNN_TEMP,
    LMBDA,
    VOCAB,
    build_pair,
    closed_loop,
    dirty_files,
    engine_levels,
    load_average,
    request_mix,
)
from provenance import git_commit, uptime

from memdec_fast.engine import Engine

PAIRS = {
    "xl": ({"n_embd": 1600, "n_layer": 48, "n_head": 25}, {"n_embd": 768, "n_layer": 12, "n_head": 12}),
    "small": ({"n_embd": 768, "n_layer": 12, "n_head": 12}, {"n_embd": 768, "n_layer": 12, "n_head": 12}),
    "tiny": ({"n_embd": 64, "n_layer": 2, "n_head": 2}, {"n_embd": 64, "n_layer": 2, "n_head": 1}),
}
MIX = {"prompt_tokens": (16, 64), "new_tokens": (8, 40)}


async def run_vllm_level(llm, reqs: list[dict], concurrency: int) -> dict:
    """The requests through vLLM's AsyncLLM with `concurrency` closed-loop workers; bench_serve.run_level's fields."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    async def deltas(r: dict):
        params = SamplingParams(temperature=0.0, max_tokens=r["max_new_tokens"], ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA, detokenize=False)
        async for out in llm.generate(TokensPrompt(prompt_token_ids=r["prompt"]), params, str(uuid.uuid4())):
            yield len(out.outputs[0].token_ids)

    return await closed_loop(deltas, reqs, concurrency)


def bench_engine(base: Path, memory: Path, tok, device: str, dtype: str, reqs: list[dict],
                 counts: dict[int, int]) -> tuple[dict, list[int]]:
    """memdec_fast.Engine at each level; and its greedy tokens for the first request."""
    engine = Engine.from_pretrained(base, memory, lmbda=LMBDA, knn_temp=KNN_TEMP, device=device,
                                    dtype=getattr(torch, dtype), tokenizer=tok, max_batch=max(counts),
                                    max_queue=len(reqs))
    try:
        first = engine.submit(reqs[0]["prompt"], max_new_tokens=reqs[0]["max_new_tokens"]).result().token_ids
        levels = engine_levels(engine, reqs, counts, "engine")
    finally:
        engine.close(timeout=0)
    return {"max_batch": engine.max_batch, "prefill_chunk": engine.prefill_chunk, "levels": levels}, first


def bench_vllm(base: Path, memory: Path, device: str, dtype: str, reqs: list[dict], counts: dict[int, int],
               eager: bool) -> tuple[dict, list[int]]:
    """vLLM with the plugin at each level; and its greedy tokens for the first request."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    overrides = {"architectures": ["MemDecForCausalLM"], "memdec_memory": str(memory), "memdec_lmbda": LMBDA,
                 "memdec_knn_temp": KNN_TEMP}
    args = AsyncEngineArgs(model=str(base), hf_overrides=overrides, dtype=dtype, max_model_len=CONTEXT,
                           max_num_seqs=max(counts), enforce_eager=eager, seed=0)

    async def run() -> tuple[list[dict], list[int]]:
        llm = AsyncLLM.from_engine_args(args)
        try:
            first = await first_tokens(llm, reqs[0])  # also the warm-up, as the Engine's first request is
            levels = []
            for c, n in counts.items():
                print(f"vllm: {n} requests at concurrency {c}", file=sys.stderr)
                levels.append(await run_vllm_level(llm, reqs[:n], c))
                print(json.dumps(levels[-1]), file=sys.stderr)
            return levels, first
        finally:
            llm.shutdown()

    levels, first = asyncio.run(run())
    return {"enforce_eager": eager, "max_num_seqs": max(counts), "levels": levels}, first


async def first_tokens(llm, r: dict) -> list[int]:
    """vLLM's greedy tokens for request `r`."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=r["max_new_tokens"], ignore_eos=True, detokenize=False)
    final = None
    async for out in llm.generate(TokensPrompt(prompt_token_ids=r["prompt"]), params, str(uuid.uuid4())):
        final = out
    return list(final.outputs[0].token_ids)


def compare(engine: dict, vllm: dict) -> list[dict]:
    """Per concurrency: vLLM's output tokens/s and p50/p99 time between tokens, over the Engine's."""
    rows = []
    for e, v in zip(engine["levels"], vllm["levels"]):
        rows.append({"concurrency": e["concurrency"],
                     "tokens_per_s": {"engine": e["output_tokens_per_s"], "vllm": v["output_tokens_per_s"],
                                      "vllm_over_engine": round(v["output_tokens_per_s"] / e["output_tokens_per_s"], 2)},
                     "itl_p50_ms": {"engine": e["itl_ms"]["p50"], "vllm": v["itl_ms"]["p50"]},
                     "itl_p99_ms": {"engine": e["itl_ms"]["p99"], "vllm": v["itl_ms"]["p99"]},
                     "ttft_p50_ms": {"engine": e["ttft_ms"]["p50"], "vllm": v["ttft_ms"]["p50"]}})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=list(PAIRS), default="small")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--requests", type=int, default=64, help="length of the request list (the most a level runs)")
    p.add_argument("--min-requests", type=int, default=8, help="requests of the smallest level")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile and CUDA graphs")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    counts = {c: min(args.requests, max(args.min_requests, 2 * c)) for c in sorted(args.concurrency)}
    reqs = request_mix(args.requests, 0, MIX["prompt_tokens"], MIX["new_tokens"])
    load_start, uptime_start, commit = load_average(), uptime(), git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        base, memory, tok = build_pair(Path(tmp), *PAIRS[args.pair])
        engine, engine_first = bench_engine(base, memory, tok, device, dtype, reqs, counts)
        vllm, vllm_first = bench_vllm(base, memory, device, dtype, reqs, counts, args.eager)
    import vllm as vllm_module

    result = {
        "benchmark": "bench_vllm", "pair": args.pair, "dims": PAIRS[args.pair], "vocab": VOCAB, "context": CONTEXT,
        "dtype": dtype, "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "torch": torch.__version__, "vllm_version": vllm_module.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty_files(), "uptime_start": uptime_start, "uptime_end": uptime(),
        "command": "python benchmarks/bench_vllm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_average_start": load_start, "load_average_end": load_average(), "lmbda": LMBDA, "knn_temp": KNN_TEMP,
        "mix": {"requests": args.requests, "per_concurrency": {str(c): n for c, n in counts.items()}, **MIX,
                "greedy": True},
        "same_first_request_tokens": engine_first == vllm_first,
        "engine": engine, "vllm": vllm, "comparison": compare(engine, vllm),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"same_first_request_tokens": result["same_first_request_tokens"],
                      "comparison": result["comparison"]}, indent=1))
    return result


if __name__ == "__main__":
    main()
