"""Regenerate the embedded demo pair in memdec_fast/data/demo/: ``python -m memdec_fast.train.make_demo``.

Everything comes from this pipeline and deterministic text (:mod:`memdec_fast.train.corpus`):

1. a byte-level BPE tokenizer trained on the background and domain corpora;
2. a tiny GPT-2 base trained on the background corpus only;
3. a datastore of the base's hidden states over the domain corpus, and its kNN targets;
4. a Memory Decoder initialised from the base and distilled from the kNN targets;
5. the mixture weight chosen on held-out validation text, stored in memory/memdec_config.json.

Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from memdec_fast.eval.perplexity import perplexity
from memdec_fast.train import corpus
from memdec_fast.train.compare import compare
from memdec_fast.train.datastore import build_datastore, tokenize_corpus
from memdec_fast.train.decoder import train_memory_decoder
from memdec_fast.train.evaluate import LMBDA_GRID, as_lines
from memdec_fast.train.loop import TrainConfig, train
from memdec_fast.train.mixing import write_mixing
from memdec_fast.train.targets import build_knn_targets

__all__ = ["DEMO_DIR", "demo_compare", "demo_domain_corpus", "demo_validation", "demo_world", "make_demo"]

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"
BLOCK = 128
HELDOUT_SEED, VALIDATION_SEED = 3, 5
KNN_TEMP = 1.0
"""Temperature of the memory's softmax in the mixture (the demo keeps it at 1)."""


def demo_world() -> list[corpus.Person]:
    """The fictional world the demo memory knows."""
    return corpus.fictional_world(n_people=40, n_towns=12, seed=0)


def demo_domain_corpus() -> list[str]:
    """The domain corpus the demo datastore and memory are built from."""
    return corpus.domain_corpus(demo_world(), docs_per_person=16)


def demo_validation() -> list[str]:
    """Held-out-style text, distinct from domain_heldout.txt, on which mixture weights are chosen."""
    return corpus.domain_heldout(demo_world(), seed=VALIDATION_SEED)


def demo_compare(work_dir: str | Path | None = None, k: int = 1024, new_tokens: int = 32) -> dict:
    """:func:`~memdec_fast.train.compare.compare` on the shipped pair and domain_heldout.txt.

    The kNN-LM's datastore is rebuilt from the shipped base and the demo's domain
    corpus (deterministic, so identical to the one the memory was trained from).
    """
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="memdec_demo_ds_"))
    ds = build_datastore(DEMO_DIR / "base", demo_domain_corpus(), work / "datastore", block_size=BLOCK)
    texts = (DEMO_DIR / "domain_heldout.txt").read_text(encoding="utf-8").splitlines()
    return compare(DEMO_DIR / "base", DEMO_DIR / "memory", ds, texts, tune_texts=demo_validation(), k=k,
                   block_size=BLOCK, stride=BLOCK // 2, new_tokens=new_tokens)


def _tokenizer(texts: list[str], out: Path, vocab_size: int) -> GPT2TokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", model_max_length=BLOCK)
    tok.save_pretrained(out)
    return tok


def _train_base(docs: list[str], tok: GPT2TokenizerFast, work: Path, out: Path, epochs: int) -> GPT2LMHeadModel:
    n = tokenize_corpus(docs, tok, work / "base_tokens.bin")
    blocks = torch.from_numpy(np.fromfile(work / "base_tokens.bin", np.int32)[: n // BLOCK * BLOCK]).long()
    blocks = blocks.view(-1, BLOCK)  # [n_blocks, BLOCK]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=BLOCK, n_embd=96, n_layer=3, n_head=3,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    tcfg = TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=20, weight_decay=0.01)

    def batches(epoch: int, skip: int):
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(epoch))
        for i in range(skip * tcfg.batch_size, len(blocks), tcfg.batch_size):
            yield blocks[order[i:i + tcfg.batch_size]]

    def loss_fn(ids: torch.Tensor):
        return model(ids, labels=ids).loss, {}

    train(model, loss_fn, batches, -(-len(blocks) // tcfg.batch_size), tcfg, work / "base.pt", desc="base")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model


def _sweep(base_dir: Path, mem_dir: Path, texts: list[str]):
    return perplexity(str(base_dir), str(mem_dir), as_lines(texts), lmbda=LMBDA_GRID, knn_temp=KNN_TEMP,
                      block_size=BLOCK, stride=BLOCK // 2, device="cpu", progress=False)


def make_demo(out_dir: str | Path = DEMO_DIR, work_dir: str | Path | None = None, base_epochs: int = 6,
              memory_epochs: int = 100, k: int = 1024, knn_temperature: float = 16.0) -> dict:
    """Build the demo pair into ``out_dir`` (base/, memory/, domain_heldout.txt, demo_prompts.json).

    Returns
    -------
    dict
        Base and joint perplexities on the held-out text, and the chosen lmbda.
    """
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="memdec_demo_"))
    world = demo_world()
    background, domain = corpus.background_corpus(), demo_domain_corpus()
    heldout, validation = corpus.domain_heldout(world, seed=HELDOUT_SEED), demo_validation()
    tok = _tokenizer(background + domain, work / "tokenizer", vocab_size=1024)
    base_dir, mem_dir = work / "base", work / "memory"
    _train_base(background, tok, work, base_dir, base_epochs)
    ds = build_datastore(base_dir, domain, work / "datastore", block_size=BLOCK)
    build_knn_targets(ds, k=k, temperature=knn_temperature)
    train_memory_decoder(ds, base_dir, mem_dir, TrainConfig(epochs=memory_epochs, batch_size=8, warmup_steps=20),
                         work_dir=work / "memory_ckpt")
    val = _sweep(base_dir, mem_dir, validation)
    lmbda = min(LMBDA_GRID, key=val.joint_ppl.__getitem__)
    write_mixing(mem_dir, lmbda, KNN_TEMP, tuned_on="demo validation text", tune_ppl=val.joint_ppl[lmbda])

    for name in ("base", "memory"):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(work / name, out / name)
    (out / "domain_heldout.txt").write_text("\n".join(heldout) + "\n")
    (out / "demo_prompts.json").write_text(json.dumps(corpus.demo_prompts(world), indent=1) + "\n")
    test = _sweep(out / "base", out / "memory", heldout)
    return {"lmbda": lmbda, "base_ppl": test.base_ppl, "joint_ppl": test.joint_ppl[lmbda],
            "memory_ppl": test.memory_ppl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEMO_DIR), help="where to write the pair (default: the package data)")
    parser.add_argument("--work", default=None, help="working directory, kept (default: a temporary one)")
    args = parser.parse_args()
    print(json.dumps(make_demo(args.out, args.work), indent=1))


if __name__ == "__main__":
    main()
