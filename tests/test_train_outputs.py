"""What the trainers leave behind: only their own files, memdec_config.json, consistent special ids; and the CLI's manners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import require_test_extras

import memdec_fast
from memdec_fast.models.checkpoint import read_mixing
from memdec_fast.train import TrainConfig, build_datastore, build_knn_targets, train_memory_decoder, train_mlp_memory
from memdec_fast.train.corpus import domain_corpus, domain_heldout, fictional_world
from memdec_fast.train.evaluate import LMBDA_GRID, as_lines
from memdec_fast.train.make_demo import DEMO_DIR

require_test_extras("faiss")

BASE = DEMO_DIR / "base"
REPO = Path(memdec_fast.__file__).parents[1]
WORLD = fictional_world(8, 4, seed=7)
DOCS = domain_corpus(WORLD, docs_per_person=3)
TUNE = domain_heldout(WORLD, seed=5)[:6]
FAST = TrainConfig(epochs=1, batch_size=8)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    ds = build_datastore(BASE, DOCS, tmp_path_factory.mktemp("ds") / "ds", block_size=32, batch_size=8)
    build_knn_targets(ds, k=16, width=8)
    return ds


def train(kind: str, ds, out: Path, **kw) -> Path:
    if kind == "decoder":
        return train_memory_decoder(ds, BASE, out, FAST, **kw)
    return train_mlp_memory(ds, out, base=BASE, n_layer=1, config=TrainConfig(epochs=1, batch_size=256), **kw)


CKPT = {"decoder": "decoder.pt", "mlp": "mlp_memory.pt"}


# -- issue 10.1: the output directory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["decoder", "mlp"])
def test_trainer_keeps_user_files_and_removes_only_its_checkpoint(ds, tmp_path, kind):
    out = tmp_path / "mem"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "notes.txt").write_text("mine")
    (out / "README.md").write_text("mine too")
    with pytest.raises(ValueError, match=r"holds files the trainer did not write \(README.md, checkpoint/notes.txt\)"
                                         r".*--overwrite"):
        train(kind, ds, out)
    assert not (out / "config.json").exists()  # refused before anything was written
    train(kind, ds, out, overwrite=True)
    assert (out / "checkpoint" / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == "mine too"
    assert not (out / "checkpoint" / CKPT[kind]).exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("kind", ["decoder", "mlp"])
def test_run_killed_after_saving_resumes_without_overwrite(ds, tmp_path, kind, monkeypatch):
    import memdec_fast.train.decoder
    import memdec_fast.train.mlp_memory

    out = tmp_path / "mem"
    module = memdec_fast.train.decoder if kind == "decoder" else memdec_fast.train.mlp_memory

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # after the weights were saved, before the checkpoint is removed

    with monkeypatch.context() as m:
        m.setattr(module, "finish_memory", killed)
        with pytest.raises(KeyboardInterrupt):
            train(kind, ds, out)
    assert (out / "checkpoint" / CKPT[kind]).is_file()
    first = (out / "model.safetensors").read_bytes()
    train(kind, ds, out)  # its own leftovers are recognised: no --overwrite needed, nothing retrained
    assert (out / "model.safetensors").read_bytes() == first
    assert not (out / "checkpoint").exists() and (out / "memdec_config.json").is_file()


# -- issue 9.4: memdec_config.json ------------------------------------------------------------------------------------


def test_decoder_writes_default_mixing_without_tune_text(ds, tmp_path):
    out = train("decoder", ds, tmp_path / "mem")
    assert json.loads((out / "memdec_config.json").read_text()) == {"lmbda": 0.55, "knn_temp": 1.0, "tuned_on": None,
                                                                     "tune_ppl": None}
    assert read_mixing(out) == {"lmbda": 0.55, "knn_temp": 1.0}


@pytest.mark.parametrize("kind", ["decoder", "mlp"])
def test_trainer_writes_mixing_tuned_on_validation_text(ds, tmp_path, kind):
    from memdec_fast.eval.perplexity import perplexity

    out = train(kind, ds, tmp_path / "mem", tune_texts=TUNE, knn_temps=(1.0, 2.0), tuned_on="val.txt")
    saved = json.loads((out / "memdec_config.json").read_text())
    sweeps = {t: perplexity(str(BASE), str(out), as_lines(TUNE), lmbda=LMBDA_GRID, knn_temp=t, block_size=32,
                            stride=16, device="cpu", progress=False).joint_ppl for t in (1.0, 2.0)}
    best = min(((t, lm) for t in sweeps for lm in LMBDA_GRID), key=lambda p: sweeps[p[0]][p[1]])
    assert (saved["knn_temp"], saved["lmbda"]) == best and saved["tuned_on"] == "val.txt"
    assert read_mixing(out) == {"lmbda": best[1], "knn_temp": best[0]}


def test_compare_writes_the_tuned_mixing(ds, tmp_path):
    from memdec_fast.train.compare import compare

    out = train("decoder", ds, tmp_path / "mem")
    result = compare(BASE, out, ds, TUNE[:2], tune_texts=TUNE, k=8, block_size=32, stride=16, new_tokens=2,
                     write_mixing=True)
    saved = json.loads((out / "memdec_config.json").read_text())
    assert saved["tuned_on"].endswith("(train compare)") and saved["lmbda"] in LMBDA_GRID
    assert result["rows"][2]["lmbda"] == saved["lmbda"] and result["memory_mixing_written"]


def test_cli_decoder_reports_the_mixing_it_wrote(ds, tmp_path, capsys):
    from memdec_fast.cli import main

    tune = tmp_path / "val.txt"
    tune.write_text("\n".join(TUNE) + "\n")
    rc = main(["train", "decoder", "--datastore", str(ds.path), "--init", str(BASE), "--out", str(tmp_path / "m"),
               "--tune-text", str(tune)])
    assert rc == 0
    mix = read_mixing(tmp_path / "m")
    assert f"lmbda {mix['lmbda']:g}, knn_temp 1 in memdec_config.json" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "memdec_config.json").read_text())["tuned_on"] == str(tune)


# -- issue 9.7: special token ids of an MLP Memory ----------------------------------------------------------------


def test_mlp_memory_config_has_the_tokenizers_special_ids(ds, tmp_path):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(BASE).eos_token_id
    config = json.loads((train("mlp", ds, tmp_path / "mlp") / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == eos < config["vocab_size"] == ds.meta["vocab_size"]
    bare = train_mlp_memory(ds, tmp_path / "bare", n_layer=1, config=TrainConfig(epochs=1, batch_size=256))
    config = json.loads((bare / "config.json").read_text())
    assert config.get("bos_token_id") is None and config.get("eos_token_id") is None  # no tokenizer: no ids


# -- issue 9.12: no transformers FutureWarning when decoding with a cache ------------------------------------------


def test_decode_steps_raise_no_future_warning(ds):
    from memdec_fast.train.compare import _joint_step, _lm_step, ms_per_token
    from memdec_fast.train.knnlm import KNNLM
    from memdec_fast.train.models import load_lm

    base, memory = load_lm(BASE), load_lm(DEMO_DIR / "memory")
    prompt = torch.tensor([[5, 17, 42, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (_lm_step(base), _joint_step(base, memory, 0.5, 1.0), KNNLM(base, ds, k=8).step):
            assert ms_per_token(step, prompt, new_tokens=3, runs=1) > 0


# -- issues 9.10 and 9.20: help shows defaults; errors are one line, exit status 2 ------------------------------------


@pytest.mark.parametrize(("step", "shown"), [("datastore", "(default: 128)"), ("targets", "(default: 1024)"),
                                             ("decoder", "(default: 0.001)"), ("mlp", "(default: gelu_new)"),
                                             ("compare", "(default: 32)")])
def test_step_help_shows_defaults(capsys, step, shown):
    from memdec_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", step, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert shown in text and "(default: None)" not in text


def cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "memdec_fast.cli", "train", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, check=False, timeout=300)


def test_datastore_errors_are_one_line_with_status_2(tmp_path, capsys):
    from memdec_fast.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(DOCS) + "\n")
    p = cli("datastore", "--base", str(BASE), "--corpus", str(corpus), "--out", str(tmp_path / "ds"), "--block-size",
            "129")  # a real process: its exit status and all it prints
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("memdec-fast train: error: --block-size 129 is longer than the base's context (128 "
                               "positions)"), p.stderr
    for name, content, said in (("bad", "[1, 2]", "bad/meta.json is corrupt (a JSON list, expected an object)"),
                                ("empty", "", "empty/meta.json is empty or corrupt")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(content)
        rc = main(["train", "datastore", "--base", str(BASE), "--corpus", str(corpus), "--out", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and said in err and "--overwrite" in err, err
