"""Greedy tokens of the embedded demo pair in bfloat16 against float32, on its held-out text (issue 22).

    python benchmarks/bf16_agreement.py --out benchmarks/results/bf16_agreement_cpu.json

Each line of domain_heldout.txt gives one prompt: its first --prompt-words words. Both dtypes run the same
prompts through the Engine (greedy, base + memory at the pair's lmbda) for --new-tokens tokens. Reported: how many
prompts agree on every token, and for the others the first position where the two differ, with each dtype's
log-probability of its own token there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit, uptime

from memdec_fast import Engine
from memdec_fast.cli.args import DEMO_DIR
from memdec_fast.models.checkpoint import read_mixing


def run(dtype: torch.dtype, prompts: list[str], new_tokens: int) -> list:
    mix = read_mixing(DEMO_DIR / "memory")
    with Engine.from_pretrained(DEMO_DIR / "base", DEMO_DIR / "memory", dtype=dtype, max_batch=len(prompts),
                                **mix) as engine:
        futures = [engine.submit(p, max_new_tokens=new_tokens) for p in prompts]
        return [f.result() for f in futures]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-words", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    lines = [line for line in (DEMO_DIR / "domain_heldout.txt").read_text().splitlines() if line.strip()]
    prompts = [" ".join(line.split()[: args.prompt_words]) for line in lines]
    f32, bf16 = (run(dt, prompts, args.new_tokens) for dt in (torch.float32, torch.bfloat16))
    rows = []
    for prompt, a, b in zip(prompts, f32, bf16, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        rows.append({"prompt": prompt, "float32": a.token_ids, "bfloat16": b.token_ids, "first_difference": first,
                     "logprobs_there": None if first is None else [a.logprobs[first], b.logprobs[first]]})
    same = sum(r["first_difference"] is None for r in rows)
    result = {"what": "issue 22: greedy tokens of the demo pair, bfloat16 against float32, Engine on the CPU",
              "prompts": len(rows), "new_tokens": args.new_tokens, "all_tokens_equal": same,
              "torch": torch.__version__, "git_commit": git_commit(), "uptime": uptime(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    print(f"{same} of {len(rows)} prompts: the same {args.new_tokens} greedy tokens in bfloat16 and float32")
    for r in rows:
        if r["first_difference"] is not None:
            print(f"  differs from token {r['first_difference']}: {r['prompt']!r}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
