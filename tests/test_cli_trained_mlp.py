"""An MLP Memory trained by ``memdec-fast train mlp``, then used by every command of the CLI (issue 19, items 1 and 6).

The trainer writes the upstream format, whose config.json says ``n_positions: 1``:
an MLP Memory reads one hidden state at a time and has no context of its own, so
the CLI must bound the context by the base alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_test_extras

import memdec_fast
from memdec_fast import JointGenerator, cli, perplexity
from memdec_fast.train.corpus import domain_corpus, domain_heldout, fictional_world
from memdec_fast.train.make_demo import DEMO_DIR

require_test_extras("faiss")

BASE = DEMO_DIR / "base"  # context: 128 positions
REPO = Path(memdec_fast.__file__).parents[1]
WORLD = fictional_world(8, 4, seed=7)


def process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``memdec-fast ARGS`` as a real process: its exit status and all it prints, transformers' logging included."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "memdec_fast.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, check=False, timeout=timeout)


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A datastore, its kNN targets and a one-block MLP Memory, all built through the CLI."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    # one document longer than the base's 128 positions: the datastore streams tokens, so this is no problem
    docs = [*domain_corpus(WORLD, docs_per_person=3), " ".join(domain_corpus(WORLD, docs_per_person=1)[:20])]
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    heldout = root / "heldout.txt"
    heldout.write_text("\n".join(domain_heldout(WORLD, seed=5)[:8]) + "\n", encoding="utf-8")
    ds, mlp = root / "ds", root / "mlp_memory"
    datastore = process("train", "datastore", "--base", str(BASE), "--corpus", str(corpus), "--out", str(ds),
                        "--block-size", "32", "--batch-size", "8")
    assert datastore.returncode == 0, datastore.stderr
    assert run(["train", "targets", "--datastore", str(ds), "--k", "16", "--width", "8"]) == 0
    assert run(["train", "mlp", "--datastore", str(ds), "--base", str(BASE), "--out", str(mlp), "--n-layer", "1",
                "--batch-size", "256"]) == 0
    return {"mlp": mlp, "heldout": heldout, "datastore_stderr": datastore.stderr,
            "pair": ["--base", str(BASE), "--memory", str(mlp), "--device", "cpu"]}


def test_the_trained_memory_says_one_position(trained):
    # the premise of the tests below: the upstream format's config bounds nothing we use
    assert json.loads((trained["mlp"] / "config.json").read_text())["n_positions"] == 1


def test_train_datastore_prints_no_transformers_warning(trained):
    err = trained["datastore_stderr"]
    assert "Token indices sequence length" not in err and "[transformers]" not in err, err


@pytest.mark.parametrize("memory_type", [None, "mlp", "auto"])
def test_generate(trained, memory_type, capsys):
    flags = [] if memory_type is None else ["--memory-type", memory_type]
    assert run(["generate", "Mira Quill lives in", *trained["pair"], *flags, "--json"]) == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    gen = JointGenerator.from_pretrained(BASE, trained["mlp"], device="cpu")
    want = gen.generate("Mira Quill lives in", max_new_tokens=64)  # the CLI's default: 64 fits the base's 128
    assert got["token_ids"] == want.token_ids[0] and got["text"] == want.texts[0]


def test_generate_streams_and_samples(trained, capsys):
    assert run(["generate", "Mira Quill lives in", *trained["pair"], "--max-new-tokens", "100", "--stream"]) == 0
    assert capsys.readouterr().out.startswith("Mira Quill lives in")
    argv = ["generate", "a", "b", *trained["pair"], "--temperature", "1", "--seed", "3", "--json"]
    assert run(argv) == 0 and run(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[:2] == lines[2:]


def test_a_decoder_type_is_refused_before_loading(trained, capsys, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(memdec_fast.JointGenerator, "from_pretrained", never)
    assert run(["generate", "x", *trained["pair"], "--memory-type", "decoder"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "MLP Memory" in err and "'mlp'" in err, err


def test_ppl(trained, capsys):
    assert run(["ppl", str(trained["heldout"]), *trained["pair"], "--json"]) == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    gen = JointGenerator.from_pretrained(BASE, trained["mlp"], device="cpu")
    want = perplexity(gen, None, trained["heldout"], block_size=128, stride=64, progress=False)
    assert got == want.to_dict()
    assert run(["ppl", str(trained["heldout"]), *trained["pair"], "--block-size", "128", "--stride", "100"]) == 0
    assert run(["ppl", str(trained["heldout"]), *trained["pair"], "--block-size", "129"]) == 2
    assert "context of 128" in capsys.readouterr().err


def test_bench(trained, capsys):
    assert run(["bench", *trained["pair"], "--repeats", "1", "--json"]) == 0, capsys.readouterr().err
    rows = json.loads(capsys.readouterr().out)["rows"]
    # the defaults of the base's context (128): a 64-token prompt and 64 new tokens, not 1 and 1
    assert [(r["prompt_tokens"], r["new_tokens"]) for r in rows] == [(64, 64)]
    assert all(r["decode_ms_per_token"] > 0 for r in rows)


def test_info(trained, capsys):
    assert run(["info", *trained["pair"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pair"]["memory"] == str(trained["mlp"])


def test_serve(trained):
    require_test_extras("fastapi", "uvicorn")
    import urllib.request

    env = os.environ | {"PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "memdec_fast.cli", "serve", *trained["pair"], "--port", "0", "--json",
            "--log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        url = json.loads(line)["url"]
        body = json.dumps({"model": "memdec-fast", "prompt": "Mira Quill lives in", "max_tokens": 100}).encode()
        request = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            choice = json.loads(response.read())["choices"][0]
        assert choice["finish_reason"] in ("length", "stop") and choice["text"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_train_compare(trained, tmp_path, capsys):
    ds = trained["mlp"].parent / "ds"
    argv = ["train", "compare", "--base", str(BASE), "--memory", str(trained["mlp"]), "--datastore", str(ds),
            "--text", str(trained["heldout"]), "--k", "8", "--new-tokens", "4", "--json"]
    assert run(argv) == 0, capsys.readouterr().err
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"base", "kNN-LM", "MLP Memory"}
    gen = JointGenerator.from_pretrained(BASE, trained["mlp"], device="cpu")
    want = perplexity(gen, None, trained["heldout"], block_size=128, stride=64, progress=False)
    assert rows["MLP Memory"]["ppl"] == pytest.approx(want.joint_ppl[0.55], rel=1e-4)
    assert rows["MLP Memory"]["ms_per_token"] > 0


def test_compare_times_the_mixture_the_runtime_decodes(trained):
    import torch

    from memdec_fast.train.compare import _memory_step
    from memdec_fast.train.models import load_lm

    gen = JointGenerator.from_pretrained(BASE, trained["mlp"], device="cpu")
    want = gen.generate("Mira Quill lives in", max_new_tokens=6)
    name, step = _memory_step(load_lm(BASE), trained["mlp"], gen.lmbda, gen.knn_temp)
    ids = torch.tensor([gen.tokenizer.encode("Mira Quill lives in")])
    got, past = [], None
    for _ in range(6):
        logp, past = step(ids, past)
        ids = logp.argmax(-1, keepdim=True)
        got.append(int(ids))
    assert name == "MLP Memory" and got == want.token_ids[0]
