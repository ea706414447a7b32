"""JointGenerator against the Engine at concurrency 1, interleaved, and JointGenerator at batch 8: issue 21's targets.

    python benchmarks/bench_runtime.py --out benchmarks/results/runtime_cpu.json

A gpt2-small-shaped pair (base and Memory Decoder both 12 x 768, vocabulary 50257, random weights, float32) on
the device given (default the CPU). Greedy, 32-token prompts of token ids, 64 new tokens, a tokenizer without EOS
so that every request runs to its last token. Variants, interleaved request by request so that both see the same
machine load:
  generator_seq   JointGenerator.generate, one request at a time
  engine_c1       Engine.submit, one request at a time (submit, wait, next)
  generator_b8    JointGenerator.generate of 8 prompts at once
Each figure is the median over --repeats rounds (after one warm-up round); every variant must return the same
tokens. Only the public API is used, so that the same script measures an older checkout too (run it with that
checkout first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_e2e import VOCAB, randomize, tokenizer
from provenance import git_commit

import memdec_fast
from memdec_fast import JointGenerator
from memdec_fast.engine import Engine
from memdec_fast.models import GPT2, GPT2Config

SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}


def build(device: torch.device) -> JointGenerator:
    torch.manual_seed(0)
    with torch.device(device):
        base, mem = (randomize(GPT2(GPT2Config(vocab_size=VOCAB, **SMALL))).eval().requires_grad_(False)
                     for _ in range(2))
    return JointGenerator(base, mem, tokenizer(VOCAB), lmbda=0.25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-only", action="store_true", help="time generator_b8 alone (to alternate checkouts)")
    p.add_argument("--label", default="", help="what is measured, e.g. the checkout's commit when it is not this one")
    p.add_argument("--out")
    args = p.parse_args()
    gen = build(torch.device(args.device))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (args.prompt_tokens,), generator=g).tolist() for _ in range(8)]
    kw = {"max_new_tokens": args.new_tokens}
    times: dict[str, list[float]] = {"generator_seq": [], "engine_c1": [], "generator_b8": []}
    with Engine(gen, max_batch=8, max_context=args.prompt_tokens + args.new_tokens) as engine:
        for rnd in range(args.repeats + 1):  # round 0: warm-up
            seq = eng = 0.0
            for prompt in [] if args.batch_only else prompts:  # interleaved, request by request
                t = time.perf_counter()
                a = gen.generate(prompt, **kw).token_ids[0]
                seq += time.perf_counter() - t
                t = time.perf_counter()
                b = engine.submit(prompt, **kw).result().token_ids
                eng += time.perf_counter() - t
                assert a == b, "JointGenerator and the Engine disagree"
            t = time.perf_counter()
            batch = gen.generate(prompts, **kw).token_ids
            b8 = time.perf_counter() - t
            if rnd:
                if not args.batch_only:
                    times["generator_seq"].append(seq / len(prompts))
                    times["engine_c1"].append(eng / len(prompts))
                times["generator_b8"].append(b8)
            print(f"round {rnd}: generator {seq / len(prompts):.3f} s/request, engine c1 {eng / len(prompts):.3f} "
                  f"s/request, generator batch 8 {b8:.3f} s", flush=True)
        assert batch == [gen.generate(q, **kw).token_ids[0] for q in prompts], "batch 8 differs from alone"
    med = {k: statistics.median(v) if v else None for k, v in times.items()}
    if args.batch_only:
        print(json.dumps({"label": args.label, "generator_b8_s": times["generator_b8"], "median": med["generator_b8"]}))
        return
    result = {
        "what": "issue 21: JointGenerator vs Engine at concurrency 1 (interleaved), JointGenerator at batch 8",
        "label": args.label,
        "pair": {"base": SMALL, "memory": SMALL, "vocab": VOCAB, "dtype": "float32"},
        "device": args.device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "memdec_fast_file": memdec_fast.__file__, "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "seconds": times, "median_s": med,
        "ms_per_token": {"generator_seq": med["generator_seq"] / args.new_tokens * 1e3,
                         "engine_c1": med["engine_c1"] / args.new_tokens * 1e3,
                         "generator_b8_per_step": med["generator_b8"] / args.new_tokens * 1e3},
        "generator_over_engine": med["generator_seq"] / med["engine_c1"],
    }
    print(json.dumps(result["ms_per_token"]), f"generator/engine = {result['generator_over_engine']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
