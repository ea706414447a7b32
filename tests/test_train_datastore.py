"""Datastore crash safety and identity: a build killed at each write point, other corpora and bases, corrupt meta.

Each kill runs the build in a subprocess that exits with os._exit (no cleanup,
no flush) at one exact point, chosen by patching the function called there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_test_extras

import memdec_fast
from memdec_fast.train import Datastore, build_datastore, build_knn_targets
from memdec_fast.train.corpus import domain_corpus, fictional_world
from memdec_fast.train.make_demo import DEMO_DIR

require_test_extras("faiss")

BASE = DEMO_DIR / "base"
REPO = Path(memdec_fast.__file__).parents[1]
DOCS_A = domain_corpus(fictional_world(8, 4, seed=7), docs_per_person=3)  # 26 blocks of 32
DOCS_B = domain_corpus(fictional_world(5, 3, seed=11), docs_per_person=2)  # 11 blocks of 32
BLOCK = 32
KILLED = 77

# Runs build_datastore(BASE, corpus, out, block_size=32, batch_size=2, flush_every=1, overwrite=...) and
# exits with status 77 at the kill point named by argv[4].
RUNNER = r"""
import os, sys
import memdec_fast.train.datastore as d
import memdec_fast.train.files as files

base, corpus, out, overwrite, kill = sys.argv[1:6]

def exit_when(pred, real):
    def patched(*args, **kwargs):
        if pred(*args, **kwargs):
            os._exit(77)
        return real(*args, **kwargs)
    return patched

if kill == "first_replace":    # inside the first meta.json write, before os.replace: the old meta stays
    files.os.replace = exit_when(lambda *a: True, os.replace)
elif kill == "allocating":     # meta says "allocating", tokens.npy re-created, keys.npy not yet
    d.open_memmap = exit_when(lambda path, *a, **k: str(path).endswith("keys.npy"), d.open_memmap)
elif kill == "arrays":         # arrays re-created, meta.json not yet rewritten to "building"
    d.write_json_atomic = exit_when(lambda p, m: m["state"] == "building" and m["blocks_done"] == 0,
                                    d.write_json_atomic)
elif kill == "keys":           # keys of the first batches written and flushed, meta.json not yet counting them
    d.write_json_atomic = exit_when(lambda p, m: m["state"] == "building" and m["blocks_done"] >= 4,
                                    d.write_json_atomic)
elif kill == "complete":       # every key written, meta.json not yet saying "complete"
    d.write_json_atomic = exit_when(lambda p, m: m["state"] == "complete", d.write_json_atomic)
d.build_datastore(base, corpus, out, block_size=32, batch_size=2, flush_every=1, overwrite=overwrite == "1")
"""


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def run_killed(corpus: Path, out: Path, kill: str, overwrite: bool = False, base: Path = BASE) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-c", RUNNER, str(base), str(corpus), str(out), "1" if overwrite else "0",
                        kill], capture_output=True, text=True, env=env, cwd=REPO, check=False, timeout=300)
    assert p.returncode == KILLED, p.stderr[-3000:]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    return {"A": write_corpus(root / "a.txt", DOCS_A), "B": write_corpus(root / "b.txt", DOCS_B)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpora) -> dict[str, np.ndarray]:
    """Keys and tokens of uninterrupted builds of A and B."""
    root = tmp_path_factory.mktemp("clean")
    out = {}
    for name, corpus in corpora.items():
        ds = build_datastore(BASE, corpus, root / name, block_size=BLOCK, batch_size=8)
        out[name] = (np.array(ds.keys), np.array(ds.tokens))
    return out


def assert_holds(ds: Datastore, clean_pair) -> None:
    keys, tokens = clean_pair
    np.testing.assert_array_equal(ds.tokens, tokens)
    np.testing.assert_array_equal(ds.keys, keys)
    assert ds.meta["state"] == "complete" and ds.meta["blocks_done"] == ds.n_blocks


def build_a_with_targets(corpora, path: Path) -> Datastore:
    ds = build_datastore(BASE, corpora["A"], path, block_size=BLOCK)
    build_knn_targets(ds, k=8, width=4)
    return ds


# -- issue 10.2: the switch window ------------------------------------------------------------------------------


def test_kill_before_first_meta_replace_leaves_old_datastore_intact(tmp_path, corpora, clean):
    ds_dir = tmp_path / "ds"
    build_a_with_targets(corpora, ds_dir)
    run_killed(corpora["B"], ds_dir, "first_replace", overwrite=True)
    assert_holds(Datastore.open(ds_dir), clean["A"])  # nothing of A was touched before meta said so
    assert_holds(build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK), clean["A"])


@pytest.mark.parametrize("kill", ["allocating", "arrays", "keys", "complete"])
def test_switch_killed_midway_never_passes_for_the_old_corpus(tmp_path, corpora, clean, kill):
    ds_dir = tmp_path / "ds"
    build_a_with_targets(corpora, ds_dir)
    run_killed(corpora["B"], ds_dir, kill, overwrite=True)
    meta = json.loads((ds_dir / "meta.json").read_text())  # always whole: written atomically
    assert meta["state"] != "complete"
    assert not (ds_dir / "knn_targets").exists() and not (ds_dir / "index.faiss").exists()  # A's, now stale
    with pytest.raises(ValueError, match="incomplete"):
        Datastore.open(ds_dir)
    # corpus A again: refused (the directory holds an unfinished B), naming the way out
    with pytest.raises(ValueError, match=r"unfinished datastore of another corpus; rerun with --overwrite"):
        build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)
    # corpus B again resumes (or restarts) and ends exactly like an uninterrupted build
    assert_holds(build_datastore(BASE, corpora["B"], ds_dir, block_size=BLOCK), clean["B"])
    # and A with --overwrite rebuilds A
    assert_holds(build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK, overwrite=True), clean["A"])


def test_killed_build_resumes_from_its_last_flush(tmp_path, corpora, clean, monkeypatch):
    ds_dir = tmp_path / "ds"
    run_killed(corpora["A"], ds_dir, "keys")
    meta = json.loads((ds_dir / "meta.json").read_text())
    assert meta["state"] == "building" and meta["blocks_done"] == 2  # the flush of blocks 2-3 never recorded
    forwards = []
    import memdec_fast.train.datastore as d

    real = d.last_mlp_inputs

    def counting(model):
        forwards.append(model)
        return real(model)

    monkeypatch.setattr(d, "last_mlp_inputs", counting)
    assert_holds(build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK, batch_size=2), clean["A"])
    assert len(forwards) == 1  # the resume re-created nothing (no hidden-size probe, which would be a second)


# -- issues 9.8 and 10.3: another corpus, another base ---------------------------------------------------------------


def test_other_corpus_is_refused_without_overwrite(tmp_path, corpora, clean):
    ds_dir = tmp_path / "ds"
    build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)
    with pytest.raises(ValueError, match="already holds a complete datastore of another corpus"):
        build_datastore(BASE, corpora["B"], ds_dir, block_size=BLOCK)
    assert_holds(Datastore.open(ds_dir), clean["A"])
    with pytest.raises(ValueError, match="another block size"):
        build_datastore(BASE, corpora["A"], ds_dir, block_size=16)
    assert_holds(build_datastore(BASE, corpora["B"], ds_dir, block_size=BLOCK, overwrite=True), clean["B"])


def test_other_base_is_refused_and_same_weights_elsewhere_resume(tmp_path, corpora, clean):
    from transformers import AutoModelForCausalLM

    ds_dir = tmp_path / "ds"
    build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)
    copy = Path(shutil.copytree(BASE, tmp_path / "base_copy"))  # same weights, another path: the same base
    assert_holds(build_datastore(copy, corpora["A"], ds_dir, block_size=BLOCK), clean["A"])
    tuned = AutoModelForCausalLM.from_pretrained(BASE)
    with torch.no_grad():
        tuned.transformer.h[0].mlp.c_fc.bias.add_(0.5)  # one weight changed: another base
    tuned.save_pretrained(tmp_path / "base2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE / f, tmp_path / "base2" / f)
    with pytest.raises(ValueError, match=r"another base \(.*then, .*base2 now\); rerun with --overwrite"):
        build_datastore(tmp_path / "base2", corpora["A"], ds_dir, block_size=BLOCK)
    rebuilt = build_datastore(tmp_path / "base2", corpora["A"], ds_dir, block_size=BLOCK, overwrite=True)
    assert not np.array_equal(rebuilt.keys, clean["A"][0])
    assert rebuilt.meta["base"]["name"].endswith("base2")


def test_other_layer_is_refused(tmp_path, corpora):
    ds_dir = tmp_path / "ds"
    build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)
    meta = json.loads((ds_dir / "meta.json").read_text())
    meta["layer"]["block"] = 0
    (ds_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="another layer"):
        build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)


def test_meta_records_base_layer_and_state(tmp_path, corpora):
    meta = build_datastore(BASE, corpora["A"], tmp_path / "ds", block_size=BLOCK).meta
    assert meta["format"] == 2 and meta["state"] == "complete"
    assert meta["base"]["name"] == str(BASE.resolve()) and len(meta["base"]["weights_sha1"]) == 40
    assert meta["layer"] == {"block": 2, "of": 3, "point": "mlp_input"}
    assert not (tmp_path / "ds" / "tokens.bin").exists()


# -- issue 10.4: unreadable meta.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "words"), [("", "empty or corrupt"), ('{"block_size": 3', "empty or corrupt"),
                                                ("[1, 2]", "expected an object")])
def test_corrupt_meta_names_the_file_and_the_way_out(tmp_path, corpora, clean, content, words):
    ds_dir = tmp_path / "ds"
    build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)
    (ds_dir / "meta.json").write_text(content)
    for call in (lambda: Datastore.open(ds_dir), lambda: build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)):
        with pytest.raises(ValueError, match=rf"meta.json is .*{words}.*--overwrite") as err:
            call()
        assert str(ds_dir / "meta.json") in str(err.value)
    assert_holds(build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK, overwrite=True), clean["A"])


def test_old_format_meta_is_not_trusted(tmp_path, corpora):
    ds_dir = tmp_path / "ds"
    build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)
    meta = json.loads((ds_dir / "meta.json").read_text())
    old = {k: meta[k] for k in ("block_size", "n_blocks", "n_keys", "dim", "vocab_size", "corpus_sha1", "blocks_done")}
    (ds_dir / "meta.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="older memdec_fast"):
        Datastore.open(ds_dir)
    with pytest.raises(ValueError, match="another format"):
        build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)


def test_open_refuses_arrays_that_disagree_with_meta(tmp_path, corpora):
    ds_dir = tmp_path / "ds"
    build_datastore(BASE, corpora["A"], ds_dir, block_size=BLOCK)
    np.save(ds_dir / "keys.npy", np.zeros((5, 96), np.float16))
    with pytest.raises(ValueError, match=r"keys.npy holds float16 \(5, 96\)"):
        Datastore.open(ds_dir)


# -- kNN targets: the same ordering ---------------------------------------------------------------------------------

TARGETS_RUNNER = r"""
import os, sys
import memdec_fast.train.targets as t

real = t.open_memmap
def patched(path, *a, **k):  # the indices re-created for the new k, the probs not yet
    if str(path).endswith("probs.npy"):
        os._exit(77)
    return real(path, *a, **k)
t.open_memmap = patched
t.build_knn_targets(sys.argv[1], k=4, width=4)
"""


def test_targets_rebuild_killed_midway_is_not_opened_as_the_old_ones(tmp_path, corpora):
    from memdec_fast.train import KnnTargets

    ds = build_a_with_targets(corpora, tmp_path / "ds")  # k=8
    env = os.environ | {"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-c", TARGETS_RUNNER, str(ds.path)], capture_output=True, text=True, env=env,
                       cwd=REPO, check=False, timeout=300)
    assert p.returncode == KILLED, p.stderr[-3000:]
    with pytest.raises(ValueError, match="incomplete"):
        KnnTargets(ds.path / "knn_targets")
    assert build_knn_targets(ds, k=4, width=4).meta["k"] == 4
