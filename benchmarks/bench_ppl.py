"""Peak memory and speed of memdec_fast.perplexity against an upstream-style evaluation.

The upstream style is Memory Decoder's ``evaluate_joint.py``: windows padded to
block_size in batches, both transformers models' logits, then full float32
log_softmaxes of both over every scored row, interpolated with logaddexp. Each
evaluation runs in its own process; peak RSS is read from /proc (VmHWM), reset
after the models and data are loaded, so the "eval" figure is what the
evaluation itself adds.

    PYTHONPATH=. python benchmarks/bench_ppl.py --out benchmarks/results/ppl_cpu.json

The pair is a tiny random GPT-2 (2 layers, 64 wide) with GPT-2's 50257-token
vocabulary and 1024-token context; the data are random token ids.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import git_commit

VOCAB, CONTEXT = 50257, 1024
ROOT = Path(__file__).resolve().parents[1]


def _status_mib(key: str) -> float:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def make_pair(root: Path) -> tuple[Path, Path]:
    """A random GPT-2 base and Memory Decoder with a 50257-token word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  eos_token=f"t{VOCAB - 1}")
    paths = root / "base", root / "memory"
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=2,
                         eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 1)
        GPT2LMHeadModel(cfg).eval().save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def upstream_eval(base, memory, ids: torch.Tensor, block: int, stride: int, batch: int, lmbda: float) -> dict:
    """evaluate_joint.py's loop: padded windows, full log_softmaxes of both models, nll_loss."""
    import torch.nn.functional as F

    n = (ids.numel() // block) * block  # upstream's group_texts drops the tail
    rows, labels = [], []
    for i in range(0, n, stride):
        lo, hi = max(i + stride - block, 0), min(i + stride, n)
        x, y = ids[lo:hi].tolist(), ids[lo:hi].tolist()
        y[: len(y) - (hi - i)] = [-100] * (len(y) - (hi - i))
        pad = block - len(x)
        rows.append(x + [VOCAB - 1] * pad)
        labels.append(y + [-100] * pad)
    rows, labels = torch.tensor(rows), torch.tensor(labels)
    nll_base = nll_joint = 0.0
    count = 0
    for s in range(0, len(rows), batch):
        x, y = rows[s : s + batch], labels[s : s + batch]
        logits, knn_logits = base(input_ids=x).logits, memory(input_ids=x).logits
        shift_logits, shift_knn = logits[:, :-1].contiguous(), knn_logits[:, :-1].contiguous()
        shift_labels = y[:, 1:].contiguous()
        mask = shift_labels != -100
        shift_logits, shift_knn, shift_labels = shift_logits[mask], shift_knn[mask], shift_labels[mask]
        lm_lp, knn_lp = F.log_softmax(shift_logits, dim=-1), F.log_softmax(shift_knn, dim=-1)
        joint = torch.logaddexp(lm_lp + math.log(1 - lmbda), knn_lp + math.log(lmbda))
        nll_base += F.nll_loss(lm_lp, shift_labels, reduction="sum").item()
        nll_joint += F.nll_loss(joint, shift_labels, reduction="sum").item()
        count += shift_labels.numel()
        del logits, knn_logits, shift_logits, shift_knn, lm_lp, knn_lp, joint
    return {"tokens": count, "base_ppl": math.exp(nll_base / count), "joint_ppl": math.exp(nll_joint / count)}


def worker(args: argparse.Namespace) -> None:
    """One evaluation in this process; prints one JSON line."""
    ids = torch.randint(0, VOCAB - 1, (args.tokens,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if args.worker == "ours":
            from memdec_fast.eval.perplexity import perplexity
            from memdec_fast.generation.generator import JointGenerator

            gen = JointGenerator.from_pretrained(args.base, args.memory, device="cpu", dtype=torch.float32)
            run = lambda x: perplexity(gen, None, x, lmbda=args.lmbda, batch_size=args.batch_size,
                                       progress=False).to_dict()
        else:
            from transformers import GPT2LMHeadModel

            base, memory = (GPT2LMHeadModel.from_pretrained(p).eval() for p in (args.base, args.memory))
            run = lambda x: upstream_eval(base, memory, x, 1024, 512, args.batch_size, args.lmbda)
        run(ids[: 2 * CONTEXT])  # warm-up
        before = _status_mib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        res = run(ids)
        seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    print(json.dumps({"method": args.worker, "batch_size": args.batch_size, "seconds": seconds,
                      "tokens_per_s": res["tokens"] / seconds, "peak_rss_mib": peak, "eval_peak_mib": peak - before,
                      "result": res}))


def spawn(method: str, batch: int, base: Path, memory: Path, tokens: int, lmbda: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--batch-size", str(batch), "--base", str(base),
           "--memory", str(memory), "--tokens", str(tokens), "--lmbda", str(lmbda)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=98 * CONTEXT, help="a multiple of 1024, so both protocols agree")
    p.add_argument("--lmbda", type=float, default=0.55)
    p.add_argument("--upstream-batch", type=int, nargs="+", default=[8, 1], help="8 is evaluate_joint.py's default")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", choices=("ours", "upstream"), help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import memdec_fast  # not in the upstream worker, which must not depend on this package

    with tempfile.TemporaryDirectory() as tmp:
        base, memory = make_pair(Path(tmp))
        ours = spawn("ours", 1, base, memory, args.tokens, args.lmbda)
        upstream = [spawn("upstream", b, base, memory, args.tokens, args.lmbda) for b in args.upstream_batch]
    commit = git_commit()
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "torch": torch.__version__,
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "compiled_ops": memdec_fast.ops.compiled_available(),
        "setup": {"tokens": args.tokens, "vocab": VOCAB, "block_size": 1024, "stride": 512, "lmbda": args.lmbda,
                  "model": "random GPT-2, 2 layers, n_embd 64, for base and memory"},
        "ours": ours,
        "upstream": upstream,
        "ratios": [{"upstream_batch": u["batch_size"],
                    "peak_rss_ratio": u["peak_rss_mib"] / ours["peak_rss_mib"],
                    "eval_peak_ratio": u["eval_peak_mib"] / ours["eval_peak_mib"],
                    "speedup": u["seconds"] / ours["seconds"]} for u in upstream],
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
