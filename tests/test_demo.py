"""memdec-fast demo: the embedded pair, next to the base alone."""

from __future__ import annotations

import json

from memdec_fast.cli.demo import DEMO_DIR, format_demo, run_demo


def test_demo_pair_is_complete():
    for name in ("base", "memory"):
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (DEMO_DIR / name / f).is_file(), (name, f)
    base_tok, mem_tok = (json.loads((DEMO_DIR / n / "tokenizer.json").read_text()) for n in ("base", "memory"))
    for key in ("vocab", "merges"):
        assert base_tok["model"][key] == mem_tok["model"][key]
    assert base_tok["added_tokens"] == mem_tok["added_tokens"]
    mix = json.loads((DEMO_DIR / "memory" / "memdec_config.json").read_text())
    assert 0 < mix["lmbda"] < 1 and mix["knn_temp"] > 0
    assert (DEMO_DIR / "domain_heldout.txt").read_text().count("\n") >= 20


def test_memory_completes_facts_the_base_cannot():
    result = run_demo(max_new_tokens=6)
    rows = result["completions"]
    right = {m: sum(r[m] == r["answer"] for r in rows) for m in ("base", "joint")}
    print(format_demo(result))
    assert right["joint"] >= right["base"] + len(rows) // 2, right
    assert result["ppl"]["joint_ppl"] < result["ppl"]["base_ppl"]


def test_demo_command(capsys):
    from memdec_fast.cli import main

    assert main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "base + memory" in out and "held-out domain text" in out
