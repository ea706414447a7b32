"""The table at the end of benchmarks/gpu_check.sh: each step and each target, passed or missed.

    python benchmarks/gpu_summary.py DIR

Reads DIR/steps.tsv (step, exit status, seconds) and the JSON the benchmarks wrote there, writes
DIR/gpu_check.json (device, torch, date, git commit, steps, targets) and prints the table. A target whose
measurement is missing is reported as "not measured", never as passed.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ops_us(ops: dict | None, name_part: str) -> float | None:
    """Median microseconds of the compiled op whose pytest-benchmark name contains name_part (CUDA, bf16)."""
    for b in (ops or {}).get("benchmarks", []):
        if name_part in b["name"] and "compiled" in b["name"] and "cuda" in b["name"]:
            return b["stats"]["median"] * 1e6
    return None


def targets(out: Path) -> list[tuple[str, str, float | None, bool | None]]:
    """(target, limit, measured, met) rows; met is None when not measured."""
    ops, e2e, serve = (_load(out / f) for f in ("ops.json", "e2e.json", "serve.json"))
    rows = []

    def row(name: str, limit: str, value: float | None, ok) -> None:
        rows.append((name, limit, value, None if value is None else bool(ok(value))))

    row("sampler greedy, B=1, V=50257 (us)", "<= 8", _ops_us(ops, "sample_greedy-compiled-B1-V50257"),
        lambda v: v <= 8)
    row("sampler top-k+top-p, B=1, V=50257 (us)", "<= 15", _ops_us(ops, "test_op[sample-compiled-B1-V50257"),
        lambda v: v <= 15)
    t = (e2e or {}).get("targets", {})
    row("gpt2-xl + gpt2 decode, batch 1 (ms/token)", "<= 1.6", t.get("graph_ms_per_step"), lambda v: v <= 1.6)
    row("memory cost vs base alone (x)", "<= 1.10", t.get("ratio_to_base_alone"), lambda v: v <= 1.10)
    s = (serve or {}).get("targets", {})
    c = s.get("concurrency", 32)
    row(f"serve: tokens/s at concurrency {c} vs one at a time (x)", ">= 6", s.get("tokens_per_s_vs_one_at_a_time"),
        lambda v: v >= 6)
    row("serve: p99 time between tokens vs batch-1 step (x)", "<= 3", s.get("p99_itl_vs_batch1_step"),
        lambda v: v <= 3)
    return rows


def main(out_dir: str) -> int:
    out = Path(out_dir)
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        steps.append({"step": name, "exit_status": int(rc), "seconds": int(seconds)})
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        version = torch.__version__
    except ImportError:
        device, version = "unknown", None
    rows = targets(out)
    report = {
        "device": device, "torch": version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("MEMDEC_FAST_COMMIT", "unknown"),
        "steps": steps,
        "targets": [{"target": n, "limit": lim, "measured": v, "met": m} for n, lim, v, m in rows],
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndevice {device}, torch {version}, commit {report['git_commit']}")
    print(f"{'step':<22}{'status':>8}{'seconds':>9}")
    for s in steps:
        print(f"{s['step']:<22}{'ok' if s['exit_status'] == 0 else 'FAILED':>8}{s['seconds']:>9}")
    print(f"\n{'target':<46}{'limit':>9}{'measured':>11}  result")
    for name, limit, value, met in rows:
        shown = "-" if value is None else f"{value:.3g}"
        verdict = "not measured" if met is None else "met" if met else "MISSED"
        print(f"{name:<46}{limit:>9}{shown:>11}  {verdict}")
    return 0 if all(s["exit_status"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu_check"))
