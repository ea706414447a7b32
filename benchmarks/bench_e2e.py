"""End-to-end decode: ms/step and tokens/s of four decode paths, on two model pairs, random weights.

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_h100.json
    python benchmarks/bench_e2e.py --tiny --out /tmp/e2e_tiny.json  # tiny models: a smoke run, CPU or GPU

Variants:
  a_upstream     two eager transformers forwards (each with its KV cache), log_softmax + logaddexp, argmax;
                 an MLP Memory reads the base's last MLP input through a forward hook
  b_eager        JointGenerator(cuda_graphs=False)
  c_graph        JointGenerator(cuda_graphs=True): each decode step one CUDA-graph replay
  d_base_graph   the same graph step with a negligible memory (an MLP Memory of 1 block, width 8): the base alone
Pairs: gpt2-xl + gpt2 as Memory Decoder; gpt2-large + an MLP Memory of 54 blocks at width 1280.

Greedy, bf16, a 128-token prompt per row, 256 new tokens. Each request is timed to its
first token (prefill included) and to its end; a decode step (one token per row) takes
the difference / 255, so ms/step excludes prefill and every step runs at the request's
own cache length. e2e tokens/s includes prefill. Each time is the median of --repeats
requests after one warm-up request (which also captures the graphs). Achieved GB/s =
weight bytes read per step x steps/s. Each variant's caches and graphs are freed before
the next, so peak memory is per variant (and batch).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import memdec_fast  # noqa: F401  (the installed package, with its compiled extension, when there is one)
except ImportError:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py, also when loaded by file path

from provenance import git_commit

from memdec_fast import JointGenerator, ops
from memdec_fast.models import GPT2, GPT2Config, MLPMemory
from memdec_fast.models.runners import cache_argument

VARIANTS = ("a_upstream", "b_eager", "c_graph", "d_base_graph")
PAIRS = {  # name: (base config, memory type, memory config)
    "gpt2-xl+gpt2-decoder": ({"n_embd": 1600, "n_layer": 48, "n_head": 25}, "decoder",
                             {"n_embd": 768, "n_layer": 12, "n_head": 12}),
    "gpt2-large+mlp-54x1280": ({"n_embd": 1280, "n_layer": 36, "n_head": 20}, "mlp",
                               {"n_embd": 1280, "n_layer": 54}),
}
TINY_PAIRS = {
    "tiny+decoder": ({"n_embd": 32, "n_layer": 2, "n_head": 4}, "decoder", {"n_embd": 48, "n_layer": 2, "n_head": 4}),
    "tiny+mlp": ({"n_embd": 32, "n_layer": 2, "n_head": 4}, "mlp", {"n_embd": 32, "n_layer": 3}),
}
VOCAB, TINY_VOCAB = 50257, 1000
LMBDA = 0.25
COPY_TB_S = 3.0  # an H100's device-to-device copy, for the bandwidth floor

Steps = Callable[[torch.Tensor, int], Iterator[object]]
"""run(ids [B, T], new_tokens): yields once after prefill and the first token, then after each decode step."""


def tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` tokens and no EOS, so that every row runs to the last token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t0")))


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """GPT-2-like random weights: N(0, 0.02) matrices, unit LayerNorm scales, zero biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return module


def weight_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the last variant left (its generator's slot caches and graphs), so that peak memory is per variant."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(run: Callable[[int], Iterator[object]], new_tokens: int, repeats: int, device: torch.device) -> dict:
    """Median wall times of run(new_tokens): to its first token, in all, and per decode step; after one warm-up.

    The decode steps are timed inside the same request, so they run at its cache
    length (not at that of a shorter baseline request). Also the peak memory of all.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    full, first, step = [], [], []
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        steps = run(new_tokens)
        next(steps)
        sync(device)
        prefilled = time.perf_counter()
        for _ in steps:
            pass
        sync(device)
        end = time.perf_counter()
        if i:  # the first request warms up (and captures the graphs)
            full.append(end - start)
            first.append(prefilled - start)
            step += [(end - prefilled) / (new_tokens - 1)] if new_tokens > 1 else []
    out = {"s_full": statistics.median(full), "s_prefill_and_first": statistics.median(first),
           "s_per_step": statistics.median(step) if step else None}
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def summarize(t: dict, batch: int, new_tokens: int, nbytes: int) -> dict:
    """Per-step figures (a step is one token per row); None without decode steps (new_tokens 1)."""
    step_s = t["s_per_step"]
    ok = step_s is not None and step_s > 0
    return dict(t, ms_per_step=step_s * 1e3 if ok else None, decode_tokens_per_s=batch / step_s if ok else None,
                e2e_tokens_per_s=batch * new_tokens / t["s_full"], weight_bytes=nbytes,
                achieved_gb_per_s=nbytes / step_s / 1e9 if ok else None)


def build_ours(base_cfg: GPT2Config, mem_type: str, mem_cfg: GPT2Config, device, dtype):
    with torch.device(device):
        base = randomize(GPT2(base_cfg)).to(dtype).eval().requires_grad_(False)
        mem = MLPMemory(mem_cfg) if mem_type == "mlp" else GPT2(mem_cfg)
        mem = randomize(mem).to(dtype).eval().requires_grad_(False)
    return base, mem


def upstream_runner(base_cfg: dict, mem_type: str, mem_cfg: dict, vocab: int, device, dtype):
    """Variant a: transformers models and the upstream loop, as run(ids, new_tokens); also their weight bytes."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    with torch.device(device):
        ids = {"bos_token_id": None, "eos_token_id": None}
        base = randomize(GPT2LMHeadModel(HFConfig(vocab_size=vocab, **ids, **base_cfg))).to(dtype).eval()
        if mem_type == "mlp":
            mem = randomize(MLPMemory(GPT2Config(vocab_size=vocab, **mem_cfg))).to(dtype).eval()
        else:
            mem = randomize(GPT2LMHeadModel(HFConfig(vocab_size=vocab, **ids, **mem_cfg))).to(dtype).eval()
    seen: list[torch.Tensor] = []
    if mem_type == "mlp":
        base.transformer.h[-1].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    log_l, log_1ml = math.log(LMBDA), math.log(1 - LMBDA)
    cache = cache_argument(base)  # the KV cache's argument name in this transformers version

    @torch.no_grad()
    def run(ids: torch.Tensor, new_tokens: int) -> Iterator[None]:
        x, past_b, past_m = ids, None, None
        for _ in range(new_tokens):
            seen.clear()
            ob = base(x, **{cache: past_b}, use_cache=True)
            past_b = getattr(ob, cache)
            if mem_type == "mlp":
                mem_logits = mem(seen[0][:, -1])
            else:
                om = mem(x, **{cache: past_m}, use_cache=True)
                past_m, mem_logits = getattr(om, cache), om.logits[:, -1]
            logp = torch.logaddexp(torch.log_softmax(ob.logits[:, -1].float(), -1) + log_1ml,
                                   torch.log_softmax(mem_logits.float(), -1) + log_l)
            x = logp.argmax(-1, keepdim=True)
            yield

    return run, weight_bytes(base, mem), (base, mem)


def base_alone_runner(base: GPT2, tok, device: torch.device, dtype: torch.dtype) -> Steps:
    """Variant d: the graph step of the base with a negligible memory (one MLP block of width 8: its weights are
    V x 8 values, under 0.03% of gpt2-large's), driven by generate()'s own loop."""
    c = base.config
    tiny = MLPMemory(GPT2Config(vocab_size=c.vocab_size, n_embd=8, n_layer=1), input_dim=c.n_embd)
    return generator_steps(JointGenerator(base, tiny.to(device=device, dtype=dtype).eval(), tok, lmbda=0.0))


def generator_steps(gen: JointGenerator) -> Steps:
    """generate()'s own greedy loop (JointGenerator._start), which yields after the first token and each step."""
    def run(ids: torch.Tensor, new_tokens: int) -> Iterator[None]:
        return gen._start(ids, new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, stop=None,
                          lmbda=None, track_text=False)[2]

    return run


def bench_pair(name: str, spec: tuple, args, device: torch.device, dtype: torch.dtype, vocab: int) -> dict:
    base_cfg, mem_type, mem_cfg = spec
    context = args.prompt_tokens + args.new_tokens
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_tokens), generator=g).to(device) for b in args.batches}
    result: dict = {"base": base_cfg, "memory_type": mem_type, "memory": mem_cfg, "variants": {}}
    variants = result["variants"]

    def measure(variant: str, run: Steps, nbytes: int) -> None:
        variants[variant] = {}
        for b in args.batches:
            t = timed(lambda n, b=b: run(prompts[b], n), args.new_tokens, args.repeats, device)
            variants[variant][str(b)] = summarize(t, b, args.new_tokens, nbytes)
            r = {k: math.nan if v is None else v for k, v in variants[variant][str(b)].items()}
            print(f"{name:24s} {variant:13s} B={b:3d} {r['ms_per_step']:8.3f} ms/step "
                  f"{r['decode_tokens_per_s']:10.1f} tok/s {r['achieved_gb_per_s']:8.1f} GB/s", flush=True)

    if "a_upstream" in args.variants:
        run, nbytes, models = upstream_runner(base_cfg, mem_type, mem_cfg, vocab, device, dtype)
        measure("a_upstream", run, nbytes)
        del run, models
        release(device)

    n_pos = {"n_positions": max(1024, context)}
    base, mem = build_ours(GPT2Config(vocab_size=vocab, **n_pos, **base_cfg), mem_type,
                           GPT2Config(vocab_size=vocab, **n_pos, **mem_cfg), device, dtype)
    result["weight_bytes"] = {"base": weight_bytes(base), "memory": weight_bytes(mem)}
    both = weight_bytes(base, mem)
    tok = tokenizer(vocab)
    for variant, graphs in (("b_eager", False), ("c_graph", True)):
        if variant not in args.variants:
            continue
        if graphs and device.type != "cuda":
            variants[variant] = {"skipped": "CUDA graphs need a CUDA device"}
            continue
        measure(variant, generator_steps(JointGenerator(base, mem, tok, lmbda=LMBDA, cuda_graphs=graphs)), both)
        release(device)
    if "d_base_graph" in args.variants:
        if device.type != "cuda":
            variants["d_base_graph"] = {"skipped": "CUDA graphs need a CUDA device"}
        else:
            measure("d_base_graph", base_alone_runner(base, tok, device, dtype), weight_bytes(base))
            release(device)
    return result


def targets(pair: dict) -> dict:
    """Issue 4's batch-1 targets for the gpt2-xl pair: speed-up, cost of the memory, share of the floor."""
    v = pair["variants"]

    def ms(variant: str) -> float | None:
        return v.get(variant, {}).get("1", {}).get("ms_per_step")  # at batch 1 a step is one token

    floor_ms = (pair["weight_bytes"]["base"] + pair["weight_bytes"]["memory"]) / (COPY_TB_S * 1e12) * 1e3
    out: dict = {"floor_ms_at_3_tb_s": floor_ms}
    graph, upstream, alone = ms("c_graph"), ms("a_upstream"), ms("d_base_graph")
    if graph:
        out |= {"graph_ms_per_step": graph, "floor_fraction": floor_ms / graph, "meets_1_6_ms": graph <= 1.6}
        if upstream:
            out |= {"speedup_vs_upstream": upstream / graph, "meets_15x": upstream / graph >= 15}
        if alone:
            out |= {"ratio_to_base_alone": graph / alone, "meets_1_15x": graph / alone <= 1.15}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/e2e_<device>.json)")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes: a smoke run that also works on a CPU")
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--pairs", nargs="+", help="pair names (default: all)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        p.exit(2, "bench_e2e: no CUDA device. This benchmark measures GPU decode; "
                  "run it on a GPU machine, or pass --tiny for a CPU smoke run.\n")
    if device.type == "cuda" and not ops.compiled_available():
        p.exit(2, "bench_e2e: the compiled extension memdec_fast._C is missing, so the graph variants would run "
                  "eagerly; build it (pip install .) first.\n")
    pairs = TINY_PAIRS if args.tiny else PAIRS
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 8, 32, 64])
    args.prompt_tokens = args.prompt_tokens or (8 if args.tiny else 128)
    args.new_tokens = args.new_tokens or (4 if args.tiny else 256)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = TINY_VOCAB if args.tiny else VOCAB
    names = args.pairs or list(pairs)
    unknown = sorted(set(names) - set(pairs))
    if unknown:
        p.error(f"unknown pairs {unknown}; expected some of {list(pairs)}")
    torch.manual_seed(0)
    report = {
        "benchmark": "bench_e2e",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "dtype": str(dtype).removeprefix("torch."),
        "compiled_extension": ops.compiled_available(),
        "tiny": args.tiny, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "batches": args.batches, "repeats": args.repeats, "lmbda": LMBDA, "greedy": True,
        "pairs": {n: bench_pair(n, pairs[n], args, device, dtype, vocab) for n in names},
    }
    first = report["pairs"].get("gpt2-xl+gpt2-decoder")
    if first is not None:
        report["targets"] = targets(first)
    default = ROOT / "benchmarks" / "results" / f"e2e_{device.type}{'_tiny' if args.tiny else ''}.json"
    out = args.out or default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
