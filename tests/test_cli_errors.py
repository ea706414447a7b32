"""The command line as a new user and a hostile one meet it: fast help, checks before loading, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memdec_fast
from memdec_fast import cli

DEMO = Path(memdec_fast.__file__).parent / "data" / "demo"


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


def run_process(args: list[str | bytes], cwd: Path | None = None) -> subprocess.CompletedProcess:
    # cwd outside the checkout: `python -c` puts the working directory first on sys.path, and a checkout's
    # memdec_fast (without the compiled extension, in a non-editable install) must not shadow the installed one
    code = "import sys; from memdec_fast.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=300, check=False,
                          cwd=cwd or DEMO)


@pytest.fixture(scope="module")
def pair(ckpts) -> list[str]:
    return ["--base", str(ckpts["base"]), "--memory", str(ckpts["decoder"]), "--device", "cpu"]


def one_line_error(capsys, match: str) -> None:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom memdec_fast.cli import build_parser\nbuild_parser().format_help()\n"
            "heavy = [m for m in ('torch', 'transformers', 'faiss', 'fastapi') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr


def test_subcommand_help_shows_defaults(capsys):
    for argv in (["generate", "--help"], ["bench", "--help"], ["train", "targets", "--help"]):
        assert run(argv) == 0
        assert "(default: " in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["generate", "x", "--stream", "--json"], "cannot be combined"),
    (["generate", ""], "empty prompt"),
    (["generate", "x", "--max-new-tokens", "500"], "context"),
    (["generate", "x", "--stop", ""], "empty stop"),
])
def test_argument_errors_come_before_any_model_loads(argv, match, capsys, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(memdec_fast.JointGenerator, "from_pretrained", never)
    assert run(argv) == 2
    one_line_error(capsys, match)


def test_bench_defaults_fit_the_demo_pair(capsys):
    assert run(["bench", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and all(r["prompt_tokens"] + r["new_tokens"] - 1 <= 128 for r in rows)


def test_generate_takes_several_prompts_and_stop_strings(pair, capsys, ckpts):
    prompts = ["the quick", "a plug and"]
    assert run(["generate", *prompts, *pair, "--max-new-tokens", "8", "--stop", "e", "--stop", "zz", "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    gen = memdec_fast.JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], device="cpu")
    want = gen.generate(prompts, max_new_tokens=8, stop=["e", "zz"])
    assert [g["text"] for g in got] == want.texts and [g["finish_reason"] for g in got] == want.finish_reasons
    assert [g["prompt"] for g in got] == prompts


@pytest.mark.parametrize("device", ["bogus", "cuda:7", "tpu"])
def test_a_device_that_does_not_exist_is_one_line(device, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    assert run(["generate", "x", "--device", device]) == 2
    one_line_error(capsys, "--device")


@pytest.mark.parametrize("content", ["[0.5]", '{"lmbda": null}', "not json"])
def test_a_broken_memdec_config_is_one_line_naming_the_file(tmp_path, ckpts, content, capsys):
    memory = tmp_path / "memory"
    shutil.copytree(ckpts["decoder"], memory)
    (memory / "memdec_config.json").write_text(content)
    assert run(["generate", "x", "--base", str(ckpts["base"]), "--memory", str(memory)]) == 2
    one_line_error(capsys, "memdec_config.json")


def test_heads_that_do_not_divide_the_width_are_one_line(tmp_path, ckpts, capsys):
    memory = tmp_path / "memory"
    shutil.copytree(ckpts["decoder"], memory)
    cfg = json.loads((memory / "config.json").read_text()) | {"n_head": 5}
    (memory / "config.json").write_text(json.dumps(cfg))
    assert run(["generate", "x", "--base", str(ckpts["base"]), "--memory", str(memory)]) == 2
    one_line_error(capsys, "n_head=5")


def test_a_prompt_that_is_not_utf8_is_one_line():
    r = run_process([b"generate", b"caf\xe9", b"--max-new-tokens", b"2"])
    err = r.stderr.decode()
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1 and "UTF-8" in err, err


def test_info_checks_the_pair(capsys, tmp_path):
    assert run(["info", "--base", str(tmp_path / "nonexistent")]) == 2
    one_line_error(capsys, "nonexistent")
    assert run(["info", "--json"]) == 0


def test_normal_use_prints_only_our_own_words():
    # no transformers warnings (past_key_values, "sequence length is longer than..."), no loading bars
    r = run_process([b"generate", b"Olga Hill lives in", b"--max-new-tokens", b"4"])
    assert r.returncode == 0 and r.stderr.decode() == "", r.stderr.decode()
    long_prompt = " ".join(["Olga Hill lives in Llequa."] * 60).encode()
    r = run_process([b"generate", long_prompt, b"--max-new-tokens", b"4"])
    err = r.stderr.decode()
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1 and "prompt too long" in err, err


def test_the_transformers_path_raises_no_future_warning(ckpts):
    code = ("import warnings; warnings.simplefilter('error', FutureWarning)\n"
            "from memdec_fast import JointGenerator\n"
            f"g = JointGenerator.from_pretrained({str(ckpts['base'])!r}, {str(ckpts['decoder'])!r}, reference=True)\n"
            "print(g.generate('the quick', max_new_tokens=4).token_ids)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                       cwd=DEMO)  # outside the checkout's import path, as in run_process
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr
