"""memdec_fast.train: datastore, kNN targets, memory training, the kNN-LM baseline and the shipped pair."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from conftest import require_test_extras

from memdec_fast.train import (
    KNNLM,
    Datastore,
    KnnTargets,
    TrainConfig,
    build_datastore,
    build_knn_targets,
    knn_distribution,
    load_mlp_memory,
    memory_loss,
    train_memory_decoder,
    train_mlp_memory,
)
from memdec_fast.train.corpus import domain_corpus, fictional_world
from memdec_fast.train.decoder import block_batches
from memdec_fast.train.make_demo import DEMO_DIR

require_test_extras("faiss")

BASE = DEMO_DIR / "base"


def write_datastore(path, keys: np.ndarray, values: np.ndarray, vocab_size: int) -> Datastore:
    """A datastore written by hand (no model): one block holding len(values) keys."""
    path.mkdir(parents=True, exist_ok=True)
    n, dim = keys.shape
    np.save(path / "keys.npy", keys.astype(np.float16))
    np.save(path / "values.npy", values.astype(np.int32))
    np.save(path / "tokens.npy", np.zeros(n + 1, np.int32))
    meta = {"format": 2, "state": "complete", "block_size": n + 1, "n_blocks": 1, "n_keys": n, "dim": dim,
            "vocab_size": vocab_size, "blocks_done": 1}
    (path / "meta.json").write_text(json.dumps(meta))
    return Datastore.open(path)


DOCS = domain_corpus(fictional_world(8, 4, seed=7), docs_per_person=3)


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Datastore:
    """The demo base's datastore over a slice of a fictional world's corpus, with kNN targets."""
    ds = build_datastore(BASE, DOCS, tmp_path_factory.mktemp("ds") / "ds", block_size=32, batch_size=8)
    build_knn_targets(ds, k=16, width=8)
    return ds


# -- kNN targets --------------------------------------------------------------------------------------------------


def test_knn_targets_hand_checkable(tmp_path):
    # 1-D keys 0, 1, 3, 10 with values 5, 6, 5, 7; k = 2 neighbours, itself dropped.
    keys = np.array([[0.0], [1.0], [3.0], [10.0]])
    ds = write_datastore(tmp_path / "ds", keys, np.array([5, 6, 5, 7]), vocab_size=9)
    t = build_knn_targets(ds, k=2, temperature=16.0, width=4)
    w = 1 / (1 + math.exp(-(9 - 1) / 16))  # row 0: neighbours at d=1 (token 6) and d=9 (token 5)
    row0 = dict(zip(t.indices[0].tolist(), t.probs[0].tolist(), strict=True))
    assert row0[6] == pytest.approx(w, abs=1e-6) and row0[5] == pytest.approx(1 - w, abs=1e-6)
    # row 1 (key 1): neighbours 0 (d=1, token 5) and 3 (d=4, token 5): all mass on token 5
    assert t.indices[1, 0] == 5 and t.probs[1, 0] == pytest.approx(1.0)
    assert t.probs[1, 1:].sum() == 0
    # row 3 (key 10): neighbours 3 (d=49, token 5) and 1 (d=81, token 6)
    w3 = 1 / (1 + math.exp(-(81 - 49) / 16))
    assert t.indices[3, :2].tolist() == [5, 6] and t.probs[3, 0] == pytest.approx(w3, abs=1e-6)
    np.testing.assert_allclose(t.probs.sum(1), 1.0, atol=1e-6)
    assert (ds.path / "index.faiss").is_file()


def test_knn_targets_truncated_rows_renormalise(tmp_path):
    keys = np.arange(6, dtype=np.float64)[:, None] * 0.1
    ds = write_datastore(tmp_path / "ds", keys, np.arange(6), vocab_size=6)
    t = build_knn_targets(ds, k=5, width=2)
    np.testing.assert_allclose(t.probs.sum(1), 1.0, atol=1e-6)
    assert t.meta["k"] == 5 and t.probs.shape == (6, 2)


def test_knn_distribution_ignores_missing_neighbours():
    p = knn_distribution(torch.tensor([[0.0, 5.0]]), torch.tensor([[1, -1]]), torch.tensor([3, 2]), 4)
    assert p.tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_bad_input_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_datastore(BASE, tmp_path / "missing.txt", tmp_path / "ds")
    with pytest.raises(ValueError, match="not a datastore"):
        Datastore.open(tmp_path)
    with pytest.raises(ValueError, match="no kNN targets"):
        KnnTargets(tmp_path)


# -- datastore ----------------------------------------------------------------------------------------------------


def test_datastore_layout_and_resume(small_ds, tmp_path):
    per = small_ds.block_size - 1
    assert small_ds.keys.shape == (small_ds.n_blocks * per, 96) and small_ds.keys.dtype == np.float16
    np.testing.assert_array_equal(small_ds.values[:per], small_ds.block(0)[1:])
    # a run stopped after the first block resumes where it stopped and gives the same keys
    import shutil

    part = tmp_path / "ds"
    shutil.copytree(small_ds.path, part, ignore=shutil.ignore_patterns("knn_targets", "index.faiss"))
    meta = json.loads((part / "meta.json").read_text())
    keys = np.load(part / "keys.npy", mmap_mode="r+")
    keys[per:] = 0
    keys.flush()
    (part / "meta.json").write_text(json.dumps({**meta, "state": "building", "blocks_done": 1}))
    with pytest.raises(ValueError, match="incomplete"):
        Datastore.open(part)
    resumed = build_datastore(BASE, DOCS, part, block_size=32)
    np.testing.assert_array_equal(resumed.keys, small_ds.keys)
    # another corpus in the same directory is refused, and replaced with overwrite
    with pytest.raises(ValueError, match="another corpus; rerun with --overwrite"):
        build_datastore(BASE, DOCS[:4], part, block_size=32)
    other = build_datastore(BASE, DOCS[:4], part, block_size=32, overwrite=True)
    assert other.n_blocks < small_ds.n_blocks


# -- training -----------------------------------------------------------------------------------------------------


def _decoder_loss(model, ds, targets) -> float:
    ids, idx, probs = next(block_batches(ds, targets, 8, seed=0, epoch=0))
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
        return float(memory_loss(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 idx.reshape(-1, idx.shape[-1]), probs.reshape(-1, probs.shape[-1]))[0])


def test_memory_decoder_steps_reduce_loss(small_ds, tmp_path):
    from transformers import AutoModelForCausalLM

    targets = KnnTargets(small_ds.path / "knn_targets")
    init = AutoModelForCausalLM.from_pretrained(BASE)
    before = _decoder_loss(init, small_ds, targets)
    out = train_memory_decoder(small_ds, init, tmp_path / "mem", TrainConfig(epochs=4, batch_size=4),
                               tokenizer_dir=BASE, work_dir=tmp_path / "ckpt")
    after = _decoder_loss(AutoModelForCausalLM.from_pretrained(out), small_ds, targets)
    assert after < before - 0.1, (before, after)
    assert (out / "tokenizer.json").is_file() and (tmp_path / "ckpt" / "decoder.pt").is_file()
    # finished: a second run resumes at the end and trains no further
    state = torch.load(tmp_path / "ckpt" / "decoder.pt", weights_only=False)
    again = train_memory_decoder(small_ds, BASE, tmp_path / "mem2", TrainConfig(epochs=4, batch_size=4),
                                 work_dir=tmp_path / "ckpt")
    assert torch.load(tmp_path / "ckpt" / "decoder.pt", weights_only=False)["step"] == state["step"]
    for k, v in AutoModelForCausalLM.from_pretrained(again).state_dict().items():
        torch.testing.assert_close(v, AutoModelForCausalLM.from_pretrained(out).state_dict()[k])


def test_mlp_memory_steps_reduce_loss(small_ds, tmp_path):
    from memdec_fast.train.mlp_memory import MLPMemory, _key_batches

    targets = KnnTargets(small_ds.path / "knn_targets")
    cfg = TrainConfig(epochs=5, batch_size=64, seed=3)
    out = train_mlp_memory(small_ds, tmp_path / "mlp", n_layer=2, n_embd=32, config=cfg)
    trained = load_mlp_memory(out)
    torch.manual_seed(cfg.seed)
    fresh = MLPMemory(trained.config, 96)
    keys, values, idx, probs = next(_key_batches(small_ds, targets, 256, seed=0, epoch=0, skip=0))
    with torch.no_grad():
        before, after = (float(memory_loss(m(keys), values, idx, probs)[0]) for m in (fresh, trained))
    assert after < before - 0.1, (before, after)
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("n_embd", [96, 48])
def test_mlp_memory_checkpoint_has_upstream_keys(small_ds, tmp_path, n_embd):
    from safetensors import safe_open

    out = train_mlp_memory(small_ds, tmp_path / "mlp", base=BASE, n_layer=2, n_embd=n_embd,
                           config=TrainConfig(epochs=1, batch_size=512))
    expected = {f"h.{i}.{name}.{p}" for i in range(2) for name in ("ln_1", "mlp.c_fc", "mlp.c_proj")
                for p in ("weight", "bias")} | {"ln_f.weight", "ln_f.bias", "lm_head.weight"}
    if n_embd != 96:
        expected |= {"embedding_transform.weight", "embedding_transform.bias"}
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == expected
        assert f.get_tensor("h.0.mlp.c_fc.weight").shape == (n_embd, 4 * n_embd)  # Conv1D: [in, out]
        assert f.get_tensor("h.0.mlp.c_proj.weight").shape == (4 * n_embd, n_embd)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2 and config["n_embd"] == n_embd
    assert config["activation_function"] == "gelu_new"
    assert json.loads((out / "mlp_memory_config.json").read_text()) == {"layer_position": -1}
    assert (out / "tokenizer.json").is_file()
    # the runtime's own loader reads it and computes the same logits
    from memdec_fast.models import MLPMemory as RuntimeMLPMemory

    hidden = torch.from_numpy(np.array(small_ds.keys[:7])).float()
    torch.testing.assert_close(RuntimeMLPMemory.from_pretrained(out)(hidden), load_mlp_memory(out)(hidden))


def test_memory_loss_is_kl_plus_ce():
    logits = torch.randn(3, 7)
    idx, probs = torch.tensor([[1, 2], [0, 0], [4, 6]]), torch.tensor([[0.75, 0.25], [1.0, 0.0], [0.5, 0.5]])
    targets = torch.tensor([1, 0, 3])
    loss, kl, ce = memory_loss(logits, targets, idx, probs)
    p = torch.zeros(3, 7).scatter_add_(1, idx, probs)
    logq = torch.log_softmax(logits, -1)
    ref_kl = (torch.xlogy(p, p) - p * logq).sum(-1).mean()
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, targets))
    torch.testing.assert_close(loss, 0.5 * ref_kl + 0.5 * ce)


# -- kNN-LM -------------------------------------------------------------------------------------------------------


def test_knnlm_matches_brute_force(small_ds):
    knn = KNNLM(BASE, small_ds, k=10, temperature=16.0, lmbda=0.3)
    ids = torch.tensor(np.asarray(small_ds.block(0)), dtype=torch.long)  # a copy: the memmap is read-only
    lp_base, lp_knn = knn.score(ids)
    from memdec_fast.train.datastore import last_mlp_inputs

    with last_mlp_inputs(knn.model) as captured, torch.no_grad():
        logits = knn.model(ids[None]).logits[0, :-1].double()
    queries = captured[0][0, :-1].double()  # [T-1, D]
    keys = torch.tensor(np.asarray(small_ds.keys), dtype=torch.float64)
    d = torch.cdist(queries, keys) ** 2  # [T-1, N]
    top = d.topk(10, largest=False)
    w = torch.softmax(-top.values / 16.0, -1)
    tokens = torch.tensor(np.asarray(small_ds.values), dtype=torch.long)[top.indices]
    p = torch.zeros(len(queries), knn.vocab_size, dtype=torch.float64).scatter_add_(1, tokens, w)
    ref_knn = p.gather(1, ids[1:, None]).squeeze(1).log()
    ref_base = torch.log_softmax(logits, -1).gather(1, ids[1:, None]).squeeze(1)
    torch.testing.assert_close(lp_knn.double(), ref_knn, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lp_base.double(), ref_base, atol=1e-4, rtol=1e-4)
    # a decoding step mixes the same way
    logp, _ = knn.step(ids[None, :5])
    mixed = torch.logaddexp(math.log(0.7) + torch.log_softmax(logits[4], -1), math.log(0.3) + p[4].log())
    torch.testing.assert_close(logp[0].double(), mixed, atol=1e-3, rtol=1e-3)


def test_ivfpq_index_for_large_datastores(small_ds):
    from memdec_fast.train.index import build_index, ivfpq_plan, search

    assert ivfpq_plan(10**8, 4096) == {"nlist": 4096, "code_bytes": 64, "nbits": 8, "nprobe": 32}
    index = build_index(small_ds.keys, exact_max=0)
    assert "IVFPQ" in type(index).__name__
    _, ids = search(index, np.asarray(small_ds.keys[:20]), 4)
    assert ids.shape == (20, 4) and (ids[:, 0] == np.arange(20)).mean() > 0.5


# -- the shipped pair ---------------------------------------------------------------------------------------------


def test_shipped_pair_joint_ppl_beats_base():
    from memdec_fast.eval.perplexity import perplexity

    mix = json.loads((DEMO_DIR / "memory" / "memdec_config.json").read_text())
    res = perplexity(str(BASE), str(DEMO_DIR / "memory"), DEMO_DIR / "domain_heldout.txt", lmbda=mix["lmbda"],
                     knn_temp=mix["knn_temp"], block_size=128, stride=64, device="cpu", progress=False)
    print(res.to_dict())
    assert res.joint_ppl[mix["lmbda"]] < 0.8 * res.base_ppl


def test_shipped_pair_is_small():
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert size < 8 * 2**20


def test_cli_registers_train_steps():
    from memdec_fast.train.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "targets", "--datastore", "ds", "--k", "8"])
    assert args.k == 8 and callable(args.func)
    args = parser.parse_args(["train", "compare"])
    assert args.base is None and callable(args.func)
