"""The memdec-fast command line: subcommands, --json output, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memdec_fast
from memdec_fast import JointGenerator, cli, perplexity


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as stop:  # argparse's own exits
        return stop.code


@pytest.fixture(scope="module")
def pair(ckpts) -> list[str]:
    return ["--base", str(ckpts["base"]), "--memory", str(ckpts["decoder"]), "--device", "cpu"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\na plug and play memory\n" * 8, encoding="utf-8")
    return path


def test_help_lists_the_subcommands(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("generate", "ppl", "bench", "info"):
        assert name in out


def test_ppl_json_is_perplexity_to_dict(pair, ckpts, text_file, capsys):
    argv = ["ppl", str(text_file), *pair, "--lmbda", "0.25", "0.55", "--knn-temp", "1.5", "--block-size", "32",
            "--stride", "16", "--batch-size", "2", "--json"]
    assert run(argv) == 0
    got = json.loads(capsys.readouterr().out)
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], device="cpu")
    want = perplexity(gen, None, text_file, lmbda=[0.25, 0.55], knn_temp=1.5, block_size=32, stride=16, progress=False)
    assert got == want.to_dict()


def test_ppl_text_output_and_defaults(pair, text_file, capsys):
    assert run(["ppl", str(text_file), *pair]) == 0  # block size defaults to the model's context (64)
    out = capsys.readouterr().out
    assert "base PPL" in out and "memory PPL" in out and "(lmbda 0.55)" in out


def test_generate(pair, ckpts, capsys):
    assert run(["generate", "the quick", *pair, "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.55, device="cpu")
    want = gen.generate("the quick", max_new_tokens=6)
    assert got["token_ids"] == want.token_ids[0] and got["text"] == want.texts[0]
    assert len(got["logprobs"]) == len(got["token_ids"]) <= 6

    assert run(["generate", "the quick", *pair, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "the quick" + want.texts[0] + "\n"
    assert run(["generate", "the quick", *pair, "--max-new-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out == "the quick" + want.texts[0] + "\n"  # the same as without --stream


def test_generate_sampling_is_seeded(pair, capsys):
    argv = ["generate", "the", *pair, "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9",
            "--top-k", "50", "--min-p", "0.01", "--seed", "3", "--lmbda", "0.3", "--json"]
    assert run(argv) == 0 and run(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert json.loads(first)["token_ids"] == json.loads(second)["token_ids"]


def test_bench(pair, capsys):
    argv = ["bench", *pair, "--prompt-tokens", "4", "16", "--new-tokens", "4", "--batch-sizes", "1", "2",
            "--repeats", "1"]
    assert run([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["batch"], r["prompt_tokens"]) for r in rows] == [(1, 4), (1, 16), (2, 4), (2, 16)]
    assert all(r["ttft_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert run(argv) == 0
    assert "TTFT ms" in capsys.readouterr().out


def test_info(capsys):
    assert run(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["build"] == memdec_fast.build_info()
    assert info["versions"]["torch"] == torch.__version__
    assert info["devices"][0]["name"] == "cpu"
    assert len(info["devices"]) == 1 + torch.cuda.device_count()
    assert run(["info"]) == 0
    assert "versions: python" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["nosuch"], "invalid choice"),
        (["ppl"], "required: file"),
        (["ppl", "{missing}"], "no such file"),
        (["ppl", "{text}", "--lmbda", "1.5"], "--lmbda: 1.5 is outside [0.0, 1.0]"),
        (["ppl", "{text}", "--block-size", "1"], "--block-size: 1 is outside [2, inf)"),
        (["ppl", "{text}", "--block-size", "65"], "exceeds the model's context of 64"),
        (["ppl", "{text}", "--block-size", "32", "--stride", "33"], "stride"),
        (["generate", "x", "--memory-type", "bogus"], "invalid choice"),
        (["generate", "x", "--stream", "--json"], "cannot be combined"),
        (["generate", "x", "--top-p", "0"], "--top-p: 0 is outside (0.0, 1.0]"),
        (["generate", "x", "--max-new-tokens", "100"], "context"),
        (["generate", "x", "--dtype", "int8"], "invalid choice"),
        (["bench", "--prompt-tokens", "60", "--new-tokens", "10"], "exceed the context of 64"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(argv, match, pair, text_file, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "missing.txt", text=text_file) for a in argv]
    assert run(argv + pair if argv[0] != "nosuch" else argv) == 2
    err = capsys.readouterr().err
    print(err)
    assert len(err.strip().splitlines()) == 1 and "error" in err and match in err


def test_missing_model_paths(tmp_path, capsys):
    argv = ["generate", "x", "--base", str(tmp_path / "nope"), "--memory", str(tmp_path / "nope")]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_default_pair_missing_is_a_clear_error(monkeypatch, text_file, tmp_path, capsys):
    monkeypatch.setattr("memdec_fast.cli.args.DEMO_DIR", tmp_path)
    assert run(["ppl", str(text_file)]) == 2
    assert "demo pair is missing" in capsys.readouterr().err


def test_as_a_process(ckpts, tmp_path):
    env = os.environ | {"PYTHONPATH": str(Path(memdec_fast.__file__).parents[1])}
    cmd = [sys.executable, "-m", "memdec_fast.cli"]
    # cwd: `python -m` puts it first on sys.path, and it must not shadow the package under test
    run = {"capture_output": True, "text": True, "env": env, "timeout": 120, "cwd": tmp_path}
    ok = subprocess.run([*cmd, "info", "--json"], check=False, **run)
    assert ok.returncode == 0 and "build" in json.loads(ok.stdout)
    bad = subprocess.run([*cmd, "ppl", str(tmp_path / "missing.txt"), "--base", str(ckpts["base"]), "--memory",
                          str(ckpts["decoder"])], check=False, **run)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_server_and_train_import_only_public_cli_names():
    """server/ and train/ import public names of memdec_fast.cli (from .args): no private name, not the module."""
    import ast

    root = Path(memdec_fast.__file__).parent
    nodes = [(p.name, n) for p in [*root.glob("server/*.py"), *root.glob("train/*.py")]
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [(f, isinstance(n, ast.Import), ".".join(filter(None, (getattr(n, "module", None), a.name))))
             for f, n in nodes for a in n.names]
    bad = [(f, name) for f, plain, name in names
           if name.startswith("memdec_fast.cli") and (plain or "._" in name or name == "memdec_fast.cli")]
    assert not bad, bad
