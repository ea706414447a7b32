"""A smoke run of benchmarks/bench_e2e.py on tiny models, so that the GPU benchmark cannot silently rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_pair_variant_and_batch(bench, tmp_path):
    out = tmp_path / "e2e.json"
    report = bench.main(["--tiny", "--out", str(out), "--batches", "1", "2", "--new-tokens", "3", "--repeats", "1"])
    assert json.loads(out.read_text()) == report
    for key in ("device", "torch", "date", "git_commit", "dtype"):
        assert report[key]
    assert report["torch"] == torch.__version__
    assert set(report["pairs"]) == {"tiny+decoder", "tiny+mlp"}
    graphs = torch.cuda.is_available()
    for pair in report["pairs"].values():
        assert pair["weight_bytes"]["base"] > 0 and pair["weight_bytes"]["memory"] > 0
        assert set(pair["variants"]) == set(bench.VARIANTS)
        for name, variant in pair["variants"].items():
            if not graphs and name in ("c_graph", "d_base_graph"):
                assert "CUDA" in variant["skipped"]
                continue
            assert set(variant) == {"1", "2"}
            for row in variant.values():
                assert row["s_full"] > 0 and row["s_prefill_and_first"] > 0 and row["e2e_tokens_per_s"] > 0
                assert row["weight_bytes"] >= pair["weight_bytes"]["base"]


def test_refuses_to_run_the_full_benchmark_without_cuda(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", "/dev/null"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
