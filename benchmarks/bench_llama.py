"""The lean Llama-family runner against the transformers fallback: greedy decode ms/step, batch 1 and 8.

    python benchmarks/bench_llama.py --out benchmarks/results/llama_cpu.json
    python benchmarks/bench_llama.py --tiny --out /tmp/llama_tiny.json  # tiny models: a smoke run
    python benchmarks/bench_llama.py --device cuda --pair 1.5b+0.5b --batches 1 8 32 --new-tokens 64 \
        --out benchmarks/results/llama_h100.json  # on a GPU: bf16, plus lean_graph (CUDA graphs)

Pair: a Qwen2-0.5B-shaped base and Memory Decoder (24 x 896, 14 heads / 2 KV heads, intermediate 4864,
vocab 151936, tied embeddings), or with --pair 1.5b+0.5b a Qwen2.5-1.5B-shaped base (28 x 1536, 12 / 2 heads,
intermediate 8960); random weights built from the config and saved in bfloat16 to a temporary
directory (no downloads), run in --dtype (float32 by default). A word-level tokenizer of 151665 tokens, Qwen2's
size, so the padded logit rows are cut as for the real models.

Both variants (lean: LlamaRunner; hf: load_causal_lm(lean=False), transformers) are loaded at once (two pairs:
8 GB in float32). Per batch size each runs one warm-up request, then --repeats rounds in which the variants
alternate, so that the load of a shared machine hits both alike; each request is timed to its first token and to
its end. Decode ms/step = (end - first) / (new_tokens - 1), the median over rounds; e2e includes prefill. The
tokens of both variants must be equal.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import memdec_fast  # noqa: F401  (the installed package, with its compiled extension)
except ImportError:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py, also when loaded by file path

from provenance import git_commit, uptime

from memdec_fast import JointGenerator
from memdec_fast.models import load_causal_lm

QWEN2_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "rope_theta": 1000000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
TINY = QWEN2_05B | {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2}
QWEN25_15B = QWEN2_05B | {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                          "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072}
PAIRS = {"0.5b": (QWEN2_05B, QWEN2_05B), "1.5b+0.5b": (QWEN25_15B, QWEN2_05B)}
TOKENIZER_ROWS = 151665  # Qwen2's tokenizer; the rest of the 151936 rows are padding


def tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` tokens and no EOS, so that every row runs to the last token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)},
                                                                               unk_token="t0")))


def save_qwen2(path: Path, dims: dict, seed: int) -> Path:
    """A random Qwen2ForCausalLM built from `dims` (transformers' init: N(0, 0.02)), saved in bfloat16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(Qwen2Config(**dims)).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    gc.collect()
    return path


def time_request(gen: JointGenerator, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list]:
    """(first-token ms, e2e ms, tokens) of one greedy request. The first token costs a prefill: a request of
    one new token is timed beside the whole one, and (e2e - first) / (new_tokens - 1) is a decode step."""
    t0 = time.perf_counter()
    gen.generate(prompts, max_new_tokens=1)
    t1 = time.perf_counter()
    tokens = gen.generate(prompts, max_new_tokens=new_tokens).token_ids
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, tokens


def load_pair(lean: bool, base: Path, memory: Path, tok, device: torch.device, dtype: torch.dtype,
              graphs: bool = False) -> tuple[JointGenerator, float]:
    t = time.perf_counter()
    runners = [load_causal_lm(p, device, dtype, lean=lean) for p in (base, memory)]
    return JointGenerator(*runners, tok, lmbda=0.55, cuda_graphs=graphs), time.perf_counter() - t


def run(gens: dict[str, JointGenerator], vocab: int, batches: list[int], prompt_len: int, new_tokens: int,
        repeats: int) -> dict:
    """Per batch: one warm-up request per variant, then `repeats` rounds, the variants alternating within each
    round so that a change in the machine's load hits both alike."""
    g = torch.Generator().manual_seed(0)
    out: dict = {name: {} for name in gens}
    for b in batches:
        prompts = torch.randint(0, vocab, (b, prompt_len), generator=g).tolist()
        for gen in gens.values():
            gen.generate(prompts, max_new_tokens=new_tokens)  # warm-up
        raw: dict = {name: {"first": [], "e2e": [], "tokens": None} for name in gens}
        for _ in range(repeats):
            for name, gen in gens.items():
                first, e2e, raw[name]["tokens"] = time_request(gen, prompts, new_tokens)
                raw[name]["first"].append(first)
                raw[name]["e2e"].append(e2e)
        for name, r in raw.items():
            steps = [(e - f) / (new_tokens - 1) for f, e in zip(r["first"], r["e2e"])]
            step = statistics.median(steps)
            out[name][f"batch_{b}"] = {
                "decode_ms_per_step": step, "decode_ms_per_token": step / b, "e2e_ms": statistics.median(r["e2e"]),
                "first_token_ms": statistics.median(r["first"]), "steps_ms": steps, "tokens": r["tokens"]}
            print(f"{name:5s} batch {b}: decode {step:.0f} ms/step ({step / b:.0f} ms/token), "
                  f"e2e {statistics.median(r['e2e']):.0f} ms, steps {[round(s) for s in steps]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tiny", action="store_true", help="tiny models: a smoke run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pair", default="0.5b", choices=list(PAIRS), help="base + memory shapes")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on the CPU, else bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    dtype = getattr(torch, args.dtype)
    shapes, vocab = ((TINY, TINY), 990) if args.tiny else (PAIRS[args.pair], TOKENIZER_ROWS)
    tok = tokenizer(vocab)
    load_before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        base, memory = save_qwen2(Path(tmp, "base"), shapes[0], 0), save_qwen2(Path(tmp, "memory"), shapes[1], 1)
        loaded = {"lean": load_pair(True, base, memory, tok, device, dtype),
                  "hf": load_pair(False, base, memory, tok, device, dtype)}
        if device.type == "cuda":  # the path users get on a GPU: every decode step one graph replay
            loaded["lean_graph"] = load_pair(True, base, memory, tok, device, dtype, graphs=True)
        gens = {name: gen for name, (gen, _) in loaded.items()}
        results = run(gens, vocab, args.batches, args.prompt_len, args.new_tokens, args.repeats)
        for name, (gen, load_s) in loaded.items():
            results[name] |= {"runner": type(gen.base).__name__, "load_s": load_s}
        del loaded, gens
        gc.collect()
    batches = [f"batch_{b}" for b in args.batches]
    same = {b: results["lean"][b]["tokens"] == results["hf"][b]["tokens"] for b in batches}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"),
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "setup": {"model": "tiny Qwen2" if args.tiny else f"random Qwen2-shaped pair {args.pair}",
                  "base_config": shapes[0], "memory_config": shapes[1], "tokenizer_tokens": vocab,
                  "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                  "repeats": args.repeats, "greedy": True, "lmbda": 0.55},
        **results, "same_tokens": same,
    }
    for name in (n for n in ("lean", "lean_graph") if n in results):
        report[f"hf_over_{name}"] = {b: {k: results["hf"][b][k] / results[name][b][k]
                                         for k in ("decode_ms_per_step", "e2e_ms")} for b in batches}
    for name in results:
        for b in batches:
            report[name][b].pop("tokens")
    print(json.dumps({k: v for k, v in report.items() if k.startswith(("same", "hf_over"))}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if dtype == torch.float32 and not all(same.values()):  # in bf16 kernels' rounding may flip a near-tie
        raise SystemExit("the lean runner's tokens differ from transformers'")
    return report


if __name__ == "__main__":
    main()
