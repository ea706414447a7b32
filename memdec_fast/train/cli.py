"""``memdec-fast train ...``: the training pipeline from the command line.

Subcommands, in pipeline order::

    memdec-fast train datastore --base BASE --corpus CORPUS.txt --out DS  [--overwrite]
    memdec-fast train targets   --datastore DS [--k 1024 --temperature 16]
    memdec-fast train decoder   --datastore DS --init SMALL_LM --out MEMORY [--tune-text VAL.txt]
    memdec-fast train mlp       --datastore DS --base BASE --out MLP_MEMORY [--tune-text VAL.txt]
    memdec-fast train compare   [--base B --memory M --datastore DS --text HELDOUT.txt [--tune-text VAL.txt]]
    memdec-fast train demo-pair [--out DIR]                                  (regenerate the demo)

Numeric flags take their ranges from :data:`memdec_fast.ranges.FLAGS` (the trainers check the same entries).
Errors (a refused --out, a corrupt meta.json, a block longer than the base's
context) are ValueErrors: ``memdec-fast`` prints them as one line and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
                         device=args.device, overwrite=args.overwrite)
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
                               work_dir=args.work_dir, device=args.device, overwrite=args.overwrite,
                               base=args.base, **_tuning(args))
    print(f"Memory Decoder saved to {out} ({_mixing_words(out)})")
    return 0


def cmd_mlp(args: argparse.Namespace) -> int:
    from memdec_fast.train.mlp_memory import train_mlp_memory

    out = train_mlp_memory(args.datastore, args.out, base=args.base, n_layer=args.n_layer, n_embd=args.n_embd,
                           activation_function=args.activation, config=_train_config(args, 1024),
                           work_dir=args.work_dir, device=args.device, overwrite=args.overwrite, **_tuning(args))
    print(f"MLP Memory saved to {out} ({_mixing_words(out)})")
    return 0


def _tuning(args: argparse.Namespace) -> dict:
    texts = _lines(args.tune_text) if args.tune_text else None
    return {"tune_texts": texts, "knn_temps": args.knn_temp, "tuned_on": args.tune_text}


def _mixing_words(memory: Path) -> str:
    from memdec_fast.models.checkpoint import MIXING_FILE, read_mixing

    mix = read_mixing(memory)
    return f"lmbda {mix['lmbda']:g}, knn_temp {mix['knn_temp']:g} in {MIXING_FILE}"


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
                         temperature=args.temperature, knn_lmbda=args.knn_lmbda, new_tokens=args.new_tokens,
                         write_mixing=True)
        if result["memory_mixing_written"]:
            print(f"tuned on {args.tune_text}: {_mixing_words(Path(args.memory))}", file=sys.stderr)
    table = format_table(result)
    if args.save:
        record = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "git_commit": _git_commit(),
                  "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                  "load_average": [round(x, 2) for x in os.getloadavg()],
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
    p.add_argument("--out", required=True, help="the memory's directory")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out holding files the trainer did not write (they are kept)")
    p.add_argument("--tune-text", help="validation text, one document per line: lmbda (and knn_temp) are chosen on "
                   "it and written to OUT/memdec_config.json (default: none, and then lmbda 0.55, knn_temp 1)")
    p.add_argument("--knn-temp", type=float, nargs="+", default=[1.0],
                   help="memory softmax temperatures to try with --tune-text")
    p.add_argument("--epochs", type=int, default=1, help="passes over the datastore")
    p.add_argument("--batch-size", type=int,
                   help="blocks (decoder, default 8) or keys (mlp, default 1024) per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate, decayed linearly to 0")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of KL(p_kNN || p_mem); 1 - alpha for CE")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="example order and initialisation")
    p.add_argument("--work-dir", help="checkpoint directory, kept (default: OUT/checkpoint, whose checkpoint file is "
                   "removed when done)")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda")


def register(subparsers) -> None:
    """Add ``train`` and its subcommands to the ``memdec-fast`` parser (whose parser class shows the defaults)."""
    train = subparsers.add_parser("train", help="build a memory for your own corpus (datastore, kNN targets, ...)")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="STEP")

    def step(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help)

    p = step("datastore", "keys (base hidden states) and values (next tokens) over a corpus")
    p.add_argument("--base", required=True, help="Hugging Face directory of the base LM")
    p.add_argument("--corpus", required=True, help="text file, one document per line")
    p.add_argument("--out", required=True, help="the datastore's directory; an unfinished build of the same corpus, "
                   "base and block size resumes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a datastore of another corpus, base or block size, or one with a corrupt meta.json")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block (at most the base's context)")
    p.add_argument("--batch-size", type=int, default=16, help="blocks per forward")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda")
    p.set_defaults(func=cmd_datastore)

    p = step("targets", "sparse kNN target distributions for every key")
    p.add_argument("--datastore", required=True, help="a datastore built by `train datastore`")
    p.add_argument("--k", type=int, default=1024, help="neighbours per key")
    p.add_argument("--temperature", type=float, default=16.0, help="p_kNN = softmax(-d / temperature)")
    p.add_argument("--width", type=int, default=64, help="tokens kept per row")
    p.add_argument("--exact-max", type=int, default=200_000, help="largest datastore searched exactly")
    p.set_defaults(func=cmd_targets)

    p = step("decoder", "train a Memory Decoder")
    p.add_argument("--datastore", required=True, help="a datastore with kNN targets")
    p.add_argument("--init", required=True, help="small causal LM sharing the base's tokenizer")
    p.add_argument("--base", help="the base to tune lmbda with (default: the one recorded in the datastore)")
    _add_training_options(p)
    p.set_defaults(func=cmd_decoder)

    p = step("mlp", "train an MLP Memory (upstream checkpoint format)")
    p.add_argument("--datastore", required=True, help="a datastore with kNN targets")
    p.add_argument("--base", help="base directory: tokenizer, ln_f / lm_head initialisation, and tuning (default "
                   "for tuning: the base recorded in the datastore)")
    p.add_argument("--n-layer", type=int, default=4, help="MLP blocks")
    p.add_argument("--n-embd", type=int, help="width of the MLP stack (default: the base's hidden size)")
    p.add_argument("--activation", default="gelu_new", help="transformers activation name")
    _add_training_options(p)
    p.set_defaults(func=cmd_mlp)

    p = step("compare", "base vs kNN-LM vs a trained memory: PPL and ms/token (default: demo pair)")
    p.add_argument("--base", help="the base LM's directory (default: the demo pair's, built on the fly)")
    p.add_argument("--memory", help="the memory's directory, a Memory Decoder or an MLP Memory (default: the demo pair's)")
    p.add_argument("--datastore", help="the base's datastore over the memory's corpus (default: the demo's)")
    p.add_argument("--text", help="held-out text file, one document per line (default: the demo's held-out text)")
    p.add_argument("--tune-text", help="text to choose lmbdas on: the kNN-LM's (else --knn-lmbda), and the memory's, "
                   "written to MEMORY/memdec_config.json (default: none, and the memory's memdec_config.json is used)")
    p.add_argument("--k", type=int, default=1024, help="kNN-LM neighbours")
    p.add_argument("--temperature", type=float, default=16.0, help="kNN-LM softmax temperature")
    p.add_argument("--knn-lmbda", type=float, help="kNN-LM weight without --tune-text (default: 0.25)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per latency run")
    p.add_argument("--work-dir", help="demo only: where to build the demo datastore (default: a temporary one)")
    p.add_argument("--save", help="also write the result, with date, versions and git commit, to this JSON file "
                   "(default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_compare)

    p = step("demo-pair", "regenerate the embedded demo pair (a few minutes on 2 cores)")
    p.add_argument("--out", help="default: the package's data/demo")
    p.add_argument("--work-dir", help="working directory, kept (default: a temporary one)")
    p.set_defaults(func=cmd_demo_pair)
