"""A smoke run of benchmarks/bench_serve.py on a tiny pair, so that the serving benchmark cannot silently rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import require_test_extras

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_level_and_the_baseline(bench, tmp_path):
    require_test_extras("matplotlib")
    out = tmp_path / "serve.json"
    report = bench.main(["--quick", "--out", str(out), "--concurrency", "1", "3", "--device", "cpu"])
    assert json.loads(out.read_text()) == report
    assert out.with_suffix(".png").stat().st_size > 0
    for key in ("device", "torch", "date", "git_commit", "driven"):
        assert report[key]
    assert report["torch"] == torch.__version__
    assert report["mix"]["per_concurrency"] == {"1": 2, "3": 6}
    reqs = bench.request_mix(8, 0, bench.QUICK["prompt_tokens"], bench.QUICK["new_tokens"])
    (run,) = report["runs"]
    assert run["dtype"] == "float32"
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 3]
    for lv, n in zip(run["levels"], (2, 6)):
        assert lv["requests"] == n
        assert lv["output_tokens"] == sum(r["max_new_tokens"] for r in reqs[:n])  # no EOS: all run to the end
        assert lv["output_tokens_per_s"] > 0
        for key in ("ttft_ms", "itl_ms"):
            assert 0 < lv[key]["p50"] <= lv[key]["p99"]
    assert run["baseline"]["requests"] == 2 and run["baseline"]["output_tokens"] == run["levels"][0]["output_tokens"]
    assert set(run["targets"]) >= {"tokens_per_s_vs_one_at_a_time", "p99_itl_vs_batch1_step"}
    assert report["targets"] == {"dtype": "float32", **run["targets"]}


def test_request_mix_is_fixed_by_its_seed(bench):
    a = bench.request_mix(16, 3, (4, 64), (8, 32))
    assert a == bench.request_mix(16, 3, (4, 64), (8, 32)) and a != bench.request_mix(16, 4, (4, 64), (8, 32))
    assert all(4 <= len(r["prompt"]) <= 64 and 8 <= r["max_new_tokens"] <= 32 for r in a)


def test_quick_memories_run_reports_both_engines_and_the_rss(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(SCRIPT.parents[1]))  # the RSS probes import this checkout
    out = tmp_path / "memories.json"
    report = bench.main(["--quick", "--memories", "2", "--out", str(out), "--device", "cpu"])
    assert json.loads(out.read_text()) == report
    require_test_extras("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 0
    (run,) = report["runs"]
    assert run["memories"] == 2 and set(run["levels"]) == {"one", "many", "one_again"}
    tokens = {label: [lv["output_tokens"] for lv in levels] for label, levels in run["levels"].items()}
    assert tokens["one"] == tokens["many"] == tokens["one_again"]  # no EOS: the same requests run to the end
    assert run["rss"]["many_memories_mb"]["rss_mb"] > 0 and len(run["rss"]["single_memory_mb"]) == 2
    assert report["targets"]["rss_ratio"] == run["rss"]["ratio"] > 0
