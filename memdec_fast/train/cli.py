"""``memdec-fast train ...``: the training pipeline from the command line.

Subcommands, in pipeline order::

    memdec-fast train datastore --base BASE --corpus CORPUS.txt --out DS
    memdec-fast train targets   --datastore DS [--k 1024 --temperature 16]
    memdec-fast train decoder   --datastore DS --init SMALL_LM --out MEMORY
    memdec-fast train mlp       --datastore DS --base BASE --out MLP_MEMORY
    memdec-fast train compare   [--base B --memory M --datastore DS --text HELDOUT.txt]   (default: the demo pair)
    memdec-fast train demo-pair [--out DIR]                                               (regenerate the demo)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["register"]


def _lines(path: str) -> list[str]:
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _train_config(args: argparse.Namespace, default_batch: int):
    from memdec_fast.train.loop import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size or default_batch, lr=args.lr,
                       warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, alpha=args.alpha,
                       save_every=args.save_every, seed=args.seed)


def cmd_datastore(args: argparse.Namespace) -> int:
    from memdec_fast.train.datastore import build_datastore

    ds = build_datastore(args.base, args.corpus, args.out, block_size=args.block_size, batch_size=args.batch_size,
                         device=args.device)
    print(f"datastore {ds.path}: {ds.keys.shape[0]} keys of size {ds.keys.shape[1]}")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from memdec_fast.train.targets import build_knn_targets

    t = build_knn_targets(args.datastore, k=args.k, temperature=args.temperature, width=args.width,
                          exact_max=args.exact_max)
    print(f"kNN targets: {t.probs.shape[0]} rows, k={t.meta['k']}, width {t.meta['width']}")
    return 0


def cmd_decoder(args: argparse.Namespace) -> int:
    from memdec_fast.train.decoder import train_memory_decoder

    out = train_memory_decoder(args.datastore, args.init, args.out, _train_config(args, 8),
                               work_dir=args.work_dir, device=args.device)
    print(f"Memory Decoder saved to {out}")
    return 0


def cmd_mlp(args: argparse.Namespace) -> int:
    from memdec_fast.train.mlp_memory import train_mlp_memory

    out = train_mlp_memory(args.datastore, args.out, base=args.base, n_layer=args.n_layer, n_embd=args.n_embd,
                           activation_function=args.activation, config=_train_config(args, 1024),
                           work_dir=args.work_dir, device=args.device)
    print(f"MLP Memory saved to {out}")
    return 0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from memdec_fast.train.compare import compare, format_table

    given = [args.base, args.memory, args.datastore, args.text]
    if any(g is not None for g in given) and not all(g is not None for g in given):
        raise ValueError("give all of --base, --memory, --datastore and --text, or none (the demo pair)")
    if args.base is None:
        from memdec_fast.train.make_demo import demo_compare

        result = demo_compare(args.work_dir, k=args.k, new_tokens=args.new_tokens)
    else:
        result = compare(args.base, args.memory, args.datastore, _lines(args.text),
                         tune_texts=_lines(args.tune_text) if args.tune_text else None, k=args.k,
                         temperature=args.temperature, knn_lmbda=args.knn_lmbda, new_tokens=args.new_tokens)
    table = format_table(result)
    if args.save:
        record = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "git_commit": _git_commit(),
                  "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                  "command": "memdec-fast " + " ".join(sys.argv[1:]), **result, "table": table}
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(result) if args.json else table)
    return 0


def cmd_demo_pair(args: argparse.Namespace) -> int:
    from memdec_fast.train.make_demo import DEMO_DIR, make_demo

    print(json.dumps(make_demo(args.out or DEMO_DIR, args.work_dir), indent=1))
    return 0


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, help="blocks (decoder, default 8) or keys (mlp, default 1024) per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of KL(p_kNN || p_mem); 1 - alpha for CE")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="checkpoint directory, kept (default: OUT/checkpoint, removed when done)")
    p.add_argument("--device", default="cpu")


def register(subparsers) -> None:
    """Add ``train`` and its subcommands to the ``memdec-fast`` parser."""
    train = subparsers.add_parser("train", help="build a memory for your own corpus (datastore, kNN targets, ...)")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="STEP")

    p = sub.add_parser("datastore", help="keys (base hidden states) and values (next tokens) over a corpus")
    p.add_argument("--base", required=True, help="Hugging Face directory of the base LM")
    p.add_argument("--corpus", required=True, help="text file, one document per line")
    p.add_argument("--out", required=True)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_datastore)

    p = sub.add_parser("targets", help="sparse kNN target distributions for every key")
    p.add_argument("--datastore", required=True)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=16.0)
    p.add_argument("--width", type=int, default=64, help="tokens kept per row")
    p.add_argument("--exact-max", type=int, default=200_000, help="largest datastore searched exactly")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("decoder", help="train a Memory Decoder")
    p.add_argument("--datastore", required=True)
    p.add_argument("--init", required=True, help="small causal LM sharing the base's tokenizer")
    p.add_argument("--out", required=True)
    _add_training_options(p)
    p.set_defaults(func=cmd_decoder)

    p = sub.add_parser("mlp", help="train an MLP Memory (upstream checkpoint format)")
    p.add_argument("--datastore", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base", help="base directory: tokenizer, and ln_f / lm_head initialisation")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--activation", default="gelu_new")
    _add_training_options(p)
    p.set_defaults(func=cmd_mlp)

    p = sub.add_parser("compare", help="base vs kNN-LM vs Memory Decoder: PPL and ms/token (default: demo pair)")
    p.add_argument("--base")
    p.add_argument("--memory")
    p.add_argument("--datastore", help="the base's datastore over the memory's corpus")
    p.add_argument("--text", help="held-out text file, one document per line")
    p.add_argument("--tune-text", help="text to choose the kNN-LM's lmbda on (else --knn-lmbda)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=16.0)
    p.add_argument("--knn-lmbda", type=float)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work-dir", help="demo only: where to build the demo datastore (default: a temporary one)")
    p.add_argument("--save", help="also write the result, with date, versions and git commit, to this JSON file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo-pair", help="regenerate the embedded demo pair (a few minutes on 2 cores)")
    p.add_argument("--out", help="default: the package's data/demo")
    p.add_argument("--work-dir", help="working directory, kept (default: a temporary one)")
    p.set_defaults(func=cmd_demo_pair)
