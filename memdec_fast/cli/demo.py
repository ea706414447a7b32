"""``memdec-fast demo``: the embedded pair at work, next to the base alone.

The pair in ``memdec_fast/data/demo/`` is a tiny GPT-2 base trained on ordinary
template English and a tiny Memory Decoder distilled, by :mod:`memdec_fast.train`,
from a datastore over facts about a fictional world (people with invented names
living in invented towns). The demo completes a few of those facts greedily,
with the base alone and with the mixture, and prints both models' perplexity
on ``domain_heldout.txt``: the world's facts in phrasings the memory never saw.
Regenerate the pair with ``memdec-fast train demo-pair``.
"""

from __future__ import annotations

import argparse
import json

from memdec_fast.cli.args import DEMO_DIR

__all__ = ["DEMO_DIR", "format_demo", "register", "run_demo"]


def run_demo(max_new_tokens: int = 8, device: str = "cpu") -> dict:
    """Fact completions (base alone vs base + memory) and held-out perplexities of the demo pair.

    Returns
    -------
    dict
        ``lmbda``, ``knn_temp``, ``completions`` (one dict per prompt: prompt,
        answer, base, joint) and ``ppl`` (:meth:`PerplexityResult.to_dict` on
        domain_heldout.txt, at the pair's lmbda).

    Example
    -------
    >>> run_demo()["ppl"]["base_ppl"] > run_demo()["ppl"]["joint_ppl"]  # doctest: +SKIP
    True
    """
    from memdec_fast import JointGenerator, perplexity
    from memdec_fast.models.checkpoint import read_mixing

    base, memory = DEMO_DIR / "base", DEMO_DIR / "memory"
    if not (base / "config.json").is_file() or not (memory / "config.json").is_file():
        raise ValueError(f"the embedded demo pair is missing from {DEMO_DIR}; run `memdec-fast train demo-pair`")
    mix = read_mixing(memory)
    prompts = json.loads((DEMO_DIR / "demo_prompts.json").read_text())
    gen = JointGenerator.from_pretrained(base, memory, lmbda=mix["lmbda"], knn_temp=mix["knn_temp"], device=device)
    texts = [p["prompt"] for p in prompts]
    joint = gen.generate(texts, max_new_tokens=max_new_tokens, stop=".").texts
    alone = gen.generate(texts, max_new_tokens=max_new_tokens, stop=".", lmbda=0.0).texts
    block = min(1024, gen.max_context)
    ppl = perplexity(gen, None, DEMO_DIR / "domain_heldout.txt", lmbda=mix["lmbda"], knn_temp=mix["knn_temp"],
                     block_size=block, stride=block // 2, progress=False)
    completions = [{**p, "base": b.strip(), "joint": j.strip()} for p, b, j in zip(prompts, alone, joint, strict=True)]
    return {**mix, "completions": completions, "ppl": {**ppl.to_dict(), "joint_ppl": ppl.joint_ppl[mix["lmbda"]]}}


def format_demo(result: dict) -> str:
    """The demo's report as text."""
    rows = result["completions"]
    width = max(len(r["prompt"]) for r in rows) + 2

    def cell(text: str, answer: str) -> str:
        return f"{text + (' (right)' if text == answer else ''):<22}"

    title = f"Embedded demo pair: a tiny base + a Memory Decoder (lmbda {result['lmbda']:g}) that learned a fictional world."
    lines = [title, "", f"{'prompt':<{width}}{'base alone':<22}{'base + memory':<22}truth"]
    lines += [f"{r['prompt']:<{width}}{cell(r['base'], r['answer'])}{cell(r['joint'], r['answer'])}{r['answer']}"
              for r in rows]
    right = [sum(r[m] == r["answer"] for r in rows) for m in ("base", "joint")]
    ppl = result["ppl"]
    held_out = (f"held-out domain text ({ppl['tokens']} tokens, domain_heldout.txt): PPL base {ppl['base_ppl']:.2f}, "
                f"base + memory {ppl['joint_ppl']:.2f} (memory alone {ppl['memory_ppl']:.2f})")
    lines += ["", f"facts completed right: base alone {right[0]}/{len(rows)}, base + memory {right[1]}/{len(rows)}",
              held_out]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo and print its report (or JSON)."""
    result = run_demo(args.max_new_tokens, args.device)
    print(json.dumps(result) if args.json else format_demo(result))
    return 0


def register(subparsers) -> None:
    """Add ``demo`` to the ``memdec-fast`` parser."""
    p = subparsers.add_parser("demo", help="the embedded pair next to the base alone: fact completions and PPL")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens per fact completion")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_demo)
