"""memdec_fast.perplexity (memdec_fast/ppl.py): the sliding-window protocol, the lambda sweep, data forms, errors and memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memdec_fast
from memdec_fast.eval.perplexity import PerplexityResult, perplexity, plan_windows
from memdec_fast.generation.generator import JointGenerator

LMBDAS = [0.0, 0.25, 0.55, 1.0]


@pytest.fixture(scope="module")
def gen(ckpts):
    return JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ids(tokenizer):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer), (301,), generator=g)


def protocol_windows(n: int, block: int, stride: int):
    """The issue's protocol, window by window, with nothing merged: (first fed, first scored, end)."""
    w = 0
    while w * stride < n:
        yield max(0, (w + 1) * stride - block), max(w * stride, 1), min((w + 1) * stride, n)
        w += 1


def reference_nll(logits_fn, ids: torch.Tensor, lmbdas, knn_temp: float, block: int, stride: int):
    """Plain float64 NLL sums of the protocol: (count, base, memory, [joint per lambda])."""
    count, nb, nm, nj = 0, 0.0, 0.0, [0.0] * len(lmbdas)
    for lo, first, hi in protocol_windows(len(ids), block, stride):
        base_logits, mem_logits = logits_fn(ids[lo:hi])  # [T, V] float64 each
        lp_b = torch.log_softmax(base_logits, -1)
        lp_m = torch.log_softmax(mem_logits / knn_temp, -1)
        for p in range(first, hi):
            b, m = lp_b[p - lo - 1, ids[p]].item(), lp_m[p - lo - 1, ids[p]].item()
            count, nb, nm = count + 1, nb - b, nm - m
            for k, lm in enumerate(lmbdas):
                nj[k] -= math.log((1 - lm) * math.exp(b) + lm * math.exp(m))
    return count, nb, nm, nj


def check_against(res: PerplexityResult, ref, lmbdas, rel: float) -> None:
    count, nb, nm, nj = ref
    print(res, {"base": math.exp(nb / count), "memory": math.exp(nm / count)})
    assert res.tokens == count
    assert res.base_ppl == pytest.approx(math.exp(nb / count), rel=rel)
    assert res.memory_ppl == pytest.approx(math.exp(nm / count), rel=rel)
    assert list(res.joint_ppl) == lmbdas
    for lm, nll in zip(lmbdas, nj):
        assert res.joint_ppl[lm] == pytest.approx(math.exp(nll / count), rel=rel)


@pytest.mark.parametrize("n", [2, 5, 64, 100, 513, 1000])
@pytest.mark.parametrize("block,stride", [(64, 32), (64, 24), (64, 63), (64, 1), (1024, 512)])
def test_plan_scores_every_token_once_with_the_protocol_context(n, block, stride):
    scored = {}
    for s in plan_windows(n, block, stride):
        assert 0 <= s.begin < s.first < s.end <= n and s.end - s.begin <= block
        for p in range(s.first, s.end):
            assert p not in scored
            scored[p] = s.begin
    expected = {p: lo for lo, first, hi in protocol_windows(n, block, stride) for p in range(first, hi)}
    assert scored == expected


@pytest.fixture(scope="module")
def decoder_pair64(ckpts, gen):
    """Both models of the decoder pair in transformers, float64: window [T] -> (base, memory) logits [T, V]."""
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(ckpts["base"]).double().eval()
    mem = GPT2LMHeadModel.from_pretrained(ckpts["decoder"]).double().eval()
    vocab = len(gen.tokenizer)

    @torch.no_grad()
    def logits(window):
        return base(window[None]).logits[0, :, :vocab], mem(window[None]).logits[0, :, :vocab]

    return logits


def test_decoder_pair_matches_float64_reference(decoder_pair64, gen, ids):
    ref = reference_nll(decoder_pair64, ids, LMBDAS, knn_temp=1.7, block=64, stride=24)
    res = perplexity(gen, None, ids, lmbda=LMBDAS, knn_temp=1.7, block_size=64, stride=24, batch_size=2, progress=False)
    check_against(res, ref, LMBDAS, rel=1e-4)


def test_a_memory_without_stored_mixing_gets_upstreams_defaults(ckpts, gen, decoder_pair64, ids):
    # no memdec_config.json beside the memory: lmbda 0.55 and knn_temp 1.0, upstream's values
    assert not (ckpts["decoder"] / "memdec_config.json").exists()
    assert (gen.lmbda, gen.knn_temp) == (0.55, 1.0)
    ref = reference_nll(decoder_pair64, ids, [0.55], knn_temp=1.0, block=64, stride=24)
    for base in (ckpts["base"], gen):
        memory = ckpts["decoder"] if base is not gen else None
        res = perplexity(base, memory, ids, block_size=64, stride=24, progress=False)
        check_against(res, ref, [0.55], rel=1e-4)


def mlp_memory64(path, hidden: torch.Tensor) -> torch.Tensor:
    """The upstream MLP Memory in float64, from the raw checkpoint tensors (Conv1D weights are [in, out])."""
    from safetensors.torch import load_file
    from transformers.activations import ACT2FN

    w = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
    cfg = json.loads((path / "config.json").read_text())
    act, eps = ACT2FN[cfg["activation_function"]], cfg["layer_norm_epsilon"]
    x = hidden.double()  # [T, input_dim]
    if "embedding_transform.weight" in w:
        x = x @ w["embedding_transform.weight"].T + w["embedding_transform.bias"]
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        x = x + act(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]) @ w[p + "mlp.c_proj.weight"] + (
            w[p + "mlp.c_proj.bias"])
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], w["ln_f.weight"], w["ln_f.bias"], eps)
    return x @ w["lm_head.weight"].T  # [T, vocab_size]


def test_mlp_memory_matches_float64_reference(ckpts, ids, tokenizer):
    # the reference shares no code with memdec_fast: transformers' GPT-2 in float64, the MLP Memory written out
    from transformers import GPT2LMHeadModel

    mlp = JointGenerator.from_pretrained(ckpts["base"], ckpts["mlp"], memory_type="mlp", device="cpu")
    base = GPT2LMHeadModel.from_pretrained(ckpts["base"]).double().eval()
    seen: list[torch.Tensor] = []  # the input of h[0]'s MLP, the memory's layer_position
    base.transformer.h[0].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    vocab = len(tokenizer)

    @torch.no_grad()
    def logits(window):
        base_logits = base(window[None]).logits[0, :, :vocab]
        return base_logits, mlp_memory64(ckpts["mlp"], seen.pop()[0])[:, :vocab]

    ref = reference_nll(logits, ids, LMBDAS, knn_temp=0.8, block=48, stride=16)
    res = perplexity(mlp, None, ids, lmbda=LMBDAS, knn_temp=0.8, block_size=48, stride=16, batch_size=3, progress=False)
    check_against(res, ref, LMBDAS, rel=1e-4)


def test_sweep_equals_separate_runs(gen, ids):
    kw = {"knn_temp": 1.3, "block_size": 64, "stride": 32, "progress": False}
    sweep = perplexity(gen, None, ids, lmbda=[0.1, 0.55, 0.9], **kw)
    for lm in (0.1, 0.55, 0.9):
        single = perplexity(gen, None, ids, lmbda=lm, **kw)
        assert single.joint_ppl == {lm: sweep.joint_ppl[lm]}
        assert (single.tokens, single.base_ppl, single.memory_ppl) == (sweep.tokens, sweep.base_ppl, sweep.memory_ppl)


def test_batch_size_and_merged_head_do_not_change_results(gen, ids):
    kw = {"lmbda": 0.55, "block_size": 64, "stride": 16, "progress": False}
    one = perplexity(gen, None, ids, batch_size=1, **kw)
    many = perplexity(gen, None, ids, batch_size=5, **kw)
    assert many.tokens == one.tokens == len(ids) - 1
    assert many.joint_ppl[0.55] == pytest.approx(one.joint_ppl[0.55], rel=1e-6)


def test_knn_temp_is_applied(gen, ids):
    kw = {"lmbda": 0.5, "block_size": 64, "stride": 32, "progress": False}
    assert perplexity(gen, None, ids, knn_temp=2.0, **kw).memory_ppl != perplexity(gen, None, ids, **kw).memory_ppl


def test_data_forms_agree(gen, tmp_path):
    lines = ["the quick brown fox jumps over the lazy dog\n", "a plug and play memory\n", "\n", "héllo wörld ✓\n"] * 6
    path = tmp_path / "text.txt"
    path.write_text("".join(lines), encoding="utf-8")
    row_ids = torch.cat([torch.tensor(gen.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in lines])
    kw = {"lmbda": [0.3], "block_size": 32, "stride": 16, "progress": False}
    want = perplexity(gen, None, row_ids, **kw)
    for data in (path, str(path), lines, row_ids.tolist(), row_ids.numpy()):
        assert perplexity(gen, None, data, **kw) == want
    whole = perplexity(gen, None, "".join(lines), **kw)  # a string is tokenized whole
    assert whole.tokens == len(gen.tokenizer("".join(lines))["input_ids"]) - 1


def test_paths_and_loaded_models(ckpts, tokenizer, gen, ids):
    from transformers import GPT2LMHeadModel

    kw = {"lmbda": 0.55, "knn_temp": 1.0, "block_size": 64, "stride": 32, "progress": False}
    want = perplexity(gen, None, ids, **kw)
    by_path = perplexity(ckpts["base"], ckpts["decoder"], ids, device="cpu", **kw)
    assert by_path == want
    models = [GPT2LMHeadModel.from_pretrained(ckpts[k]).eval() for k in ("base", "decoder")]
    loaded = perplexity(*models, ids, tokenizer=tokenizer, **kw)
    assert loaded.joint_ppl[0.55] == pytest.approx(want.joint_ppl[0.55], rel=1e-5)


def test_to_dict_is_json(gen, ids):
    res = perplexity(gen, None, ids, lmbda=[0.25, 0.55], block_size=64, stride=32, progress=False)
    d = json.loads(json.dumps(res.to_dict()))
    assert d == {"tokens": 300, "base_ppl": res.base_ppl, "memory_ppl": res.memory_ppl,
                 "joint_ppl": {"0.25": res.joint_ppl[0.25], "0.55": res.joint_ppl[0.55]}}


def test_progress_bar_shows_tokens_per_second(gen, ids, capsys):
    perplexity(gen, None, ids, block_size=64, stride=32)
    assert "tok/s" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 65}, "exceeds the model's context of 64"),
        ({"block_size": 64, "stride": 65}, "stride"),  # stride == block_size is allowed: disjoint windows
        ({"block_size": 64, "stride": 0}, "stride"),
        ({"lmbda": 1.5}, "lmbda"),
        ({"lmbda": []}, "lmbda"),
        ({"knn_temp": 0.0}, "knn_temp"),
        ({"batch_size": 0}, "batch_size"),
        ({"data": [3]}, "at least 2"),
        ({"data": [0, 10**6]}, "token ids must lie"),
        ({"data": [1, "a"]}, "only strings or only token ids"),
        ({"data": torch.zeros(2, 3, dtype=torch.long)}, "1-D"),
        ({"memory": "x"}, "memory, device, dtype and tokenizer must be None"),
    ],
)
def test_errors(gen, ids, kwargs, match):
    args = {"base": gen, "memory": None, "data": ids, "block_size": 64, "stride": 32, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        perplexity(**args)


def test_path_base_needs_a_memory(ckpts, ids):
    with pytest.raises(ValueError, match="memory"):
        perplexity(ckpts["base"], None, ids, block_size=64, stride=32)


_PEAK_SCRIPT = """
import json, re, sys, torch
from memdec_fast.generation.generator import JointGenerator
from memdec_fast.eval.perplexity import perplexity

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

def extra_peak_mib(fn):
    # "5" resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before

gen = JointGenerator.from_pretrained(sys.argv[1], sys.argv[2], device="cpu", dtype=torch.float32)
vocab, n = len(gen.tokenizer), int(sys.argv[3])
ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
run = lambda length: perplexity(gen, None, ids[:length], lmbda=[0.25, 0.55], block_size=64, stride=32, progress=False)
run(2048)  # warm-up: first-call allocations are not the point
out = {"vocab": vocab, "short": extra_peak_mib(lambda: run(2048)), "long": extra_peak_mib(lambda: run(n))}
# the canary: one [tokens, V] float32 tensor, to show that the measure sees such an allocation
out["canary"] = extra_peak_mib(lambda: torch.ones(n, vocab))
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_peak_memory_does_not_grow_with_tokens_times_vocab(ckpts, tmp_path):
    n = 40_000
    # the subprocess imports the memdec_fast under test (a checkout or the installed package)
    env = os.environ | {"PYTHONPATH": str(Path(memdec_fast.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PEAK_SCRIPT), str(ckpts["base"]), str(ckpts["decoder"]), str(n)],
        capture_output=True, text=True, env=env, timeout=300, check=True, cwd=tmp_path,  # cwd must not shadow it
    )
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    one_copy = n * m["vocab"] * 4 / 2**20  # MiB of one [tokens, V] float32 tensor
    growth = m["long"] - m["short"]
    print(m, f"growth {growth:.1f} MiB, one [tokens, V] copy {one_copy:.1f} MiB")
    assert m["canary"] > 0.8 * one_copy  # the measure sees a [tokens, V] tensor
    assert growth < 0.1 * one_copy
