"""generate and ppl take one --memory NAME=PATH (the name is a label); serve's several memories live in
tests/test_server_memories.py."""

from __future__ import annotations

import json

import pytest
from test_cli import run, text_file  # noqa: F401 - text_file is a fixture


@pytest.fixture(scope="module")
def pairs(ckpts) -> tuple[list[str], list[str]]:
    """(plain, named): the same pair with --memory PATH and with --memory bio=PATH."""
    common = ["--base", str(ckpts["base"]), "--device", "cpu"]
    return common + ["--memory", str(ckpts["decoder"])], common + ["--memory", f"bio={ckpts['decoder']}"]


def test_generate_with_a_named_memory_equals_the_plain_path(pairs, capsys):
    outs = []
    for pair in pairs:
        assert run(["generate", "the quick", *pair, "--max-new-tokens", "6", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1]


def test_ppl_with_a_named_memory_equals_the_plain_path(pairs, text_file, capsys):  # noqa: F811
    outs = []
    for pair in pairs:
        assert run(["ppl", str(text_file), *pair, "--block-size", "32", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("command", ["generate", "ppl"])
def test_two_memories_are_one_line_error(ckpts, text_file, command, capsys):  # noqa: F811
    first = "the quick" if command == "generate" else str(text_file)
    argv = [command, first, "--base", str(ckpts["base"]), "--memory", f"bio={ckpts['decoder']}",
            "--memory", f"fin={ckpts['mlp']}", "--device", "cpu"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--memory: given 2 times; this command takes one memory" in err
