"""End-to-end generation latency, for ``memdec-fast bench``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from memdec_fast import ranges


def _prompts(gen, batch: int, length: int, seed: int) -> list[list[int]]:
    """Random token ids (never EOS), so that every configuration sees the same kind of input."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(gen.tokenizer), (batch, length), generator=g)
    eos = gen.tokenizer.eos_token_id
    if eos is not None:
        ids[ids == eos] = (eos + 1) % len(gen.tokenizer)
    return ids.tolist()


def _timed(gen, prompts: list[list[int]], new_tokens: int) -> tuple[float, int, int]:
    """(seconds, decode steps, tokens generated) of one greedy generate call."""
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    t0 = time.perf_counter()
    res = gen.generate(prompts, max_new_tokens=new_tokens, temperature=0.0)
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    return time.perf_counter() - t0, max(len(t) for t in res.token_ids), sum(len(t) for t in res.token_ids)


def bench_lengths(context: int, prompt_tokens: Sequence[int] | None, new_tokens: int | None
                  ) -> tuple[list[int], int]:
    """(prompt lengths, new tokens): the flags, else 128 and 64 cut to fit `context`; ValueError when they cannot fit."""
    prompts = list(prompt_tokens) if prompt_tokens else [max(1, min(128, context // 2))]
    if new_tokens is None:
        new_tokens = max(1, min(64, context - max(prompts) + 1))
    for length in prompts:
        if length + new_tokens - 1 > context:
            raise ValueError(f"--prompt-tokens {length} + --new-tokens {new_tokens} exceed the context of {context}")
    return prompts, new_tokens


def run_bench(
    gen, prompt_lengths: Sequence[int], batch_sizes: Sequence[int], new_tokens: int, repeats: int
) -> list[dict]:
    """Median latencies of greedy generation, one row per (batch size, prompt length).

    TTFT is a generate call for one token (prefill and the first sample); the
    per-token decode latency is the rest of a full call divided by its extra steps.
    A warm-up call precedes each configuration.

    Returns
    -------
    list of dict
        batch, prompt_tokens, new_tokens, ttft_ms, decode_ms_per_token, tokens_per_s.
    """
    for key, values in (("prompt_tokens", prompt_lengths), ("batch_size", batch_sizes), ("new_tokens", [new_tokens]),
                        ("repeats", [repeats])):
        for value in values:
            ranges.check(f"bench.{key}", value)
    bench_lengths(gen.max_context, prompt_lengths, new_tokens)  # ValueError unless every prompt fits
    rows = []
    for batch in batch_sizes:
        for length in prompt_lengths:
            prompts = _prompts(gen, batch, length, seed=length * 1000 + batch)
            _timed(gen, prompts, min(2, new_tokens))
            first = statistics.median(_timed(gen, prompts, 1)[0] for _ in range(repeats))
            runs = [_timed(gen, prompts, new_tokens) for _ in range(repeats)]
            full, steps, made = (statistics.median(r[i] for r in runs) for i in range(3))
            rows.append({
                "batch": batch, "prompt_tokens": length, "new_tokens": new_tokens, "ttft_ms": 1e3 * first,
                "decode_ms_per_token": 1e3 * max(full - first, 0.0) / max(steps - 1, 1),
                "tokens_per_s": made / full,
            })
    return rows
