"""Base vs kNN-LM vs a trained memory (Memory Decoder or MLP Memory): perplexity and per-token decoding latency.

Latency is measured the same way for all three: greedy decoding at batch size 1
with a KV cache, the prompt's prefill excluded, after one warm-up run; the
median over runs of the mean time per new token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memdec_fast import ops, ranges
from memdec_fast.models.checkpoint import read_json, read_mixing
from memdec_fast.models.runners import mlp_blocks
from memdec_fast.train.datastore import Datastore
from memdec_fast.train.evaluate import as_lines, best_lmbda, mixture_ppl, windowed_logprobs
from memdec_fast.train.knnlm import KNNLM
from memdec_fast.train.mixing import tune_mixing
from memdec_fast.train.mixing import write_mixing as save_mixing
from memdec_fast.train.models import forward_cached, load_lm, load_tokenizer

__all__ = ["compare", "format_table", "ms_per_token"]

Step = Callable[[torch.Tensor, object], tuple[torch.Tensor, object]]


def _lm_step(model: torch.nn.Module) -> Step:
    @torch.inference_mode()
    def step(ids, past):
        out, cache = forward_cached(model, ids, past)
        return torch.log_softmax(out.logits[:, -1].float(), -1), cache
    return step


def _joint_step(base: torch.nn.Module, memory: torch.nn.Module, lmbda: float, knn_temp: float) -> Step:
    @torch.inference_mode()
    def step(ids, past):
        pb, pm = past if past is not None else (None, None)
        ob, cb = forward_cached(base, ids, pb)
        om, cm = forward_cached(memory, ids, pm)
        logp = ops.joint_logprobs(ob.logits[:, -1].float(), om.logits[:, -1].float(), lmbda, knn_temp)
        return logp, (cb, cm)
    return step


def _mlp_step(base: torch.nn.Module, memory: torch.nn.Module, layer: int, lmbda: float, knn_temp: float) -> Step:
    """The base mixed with an MLP Memory, which reads the hidden state entering block `layer`'s MLP."""
    @torch.inference_mode()
    def step(ids, past):
        captured = []
        hook = lambda _m, args, _out: captured.append(args[0])
        handle = mlp_blocks(base)[layer].mlp.register_forward_hook(hook)
        try:
            ob, cache = forward_cached(base, ids, past)
        finally:
            handle.remove()
        om = memory(captured[0][:, -1])  # [B, V]
        return ops.joint_logprobs(ob.logits[:, -1].float(), om.float(), lmbda, knn_temp), cache
    return step


def _memory_step(base: torch.nn.Module, memory_dir: str | Path, lmbda: float, knn_temp: float) -> tuple[str, Step]:
    """(the memory's name in the table, its decoding step): a Memory Decoder or an MLP Memory."""
    from memdec_fast.models import detect_memory_type
    from memdec_fast.train.mlp_memory import load_mlp_memory

    if detect_memory_type(memory_dir) == "mlp":
        config = Path(memory_dir) / "mlp_memory_config.json"
        layer = int(read_json(config).get("layer_position", -1)) if config.is_file() else -1
        return "MLP Memory", _mlp_step(base, load_mlp_memory(memory_dir), layer, lmbda, knn_temp)
    return "Memory Decoder", _joint_step(base, load_lm(memory_dir), lmbda, knn_temp)


def ms_per_token(step: Step, prompt: torch.Tensor, new_tokens: int = 32, runs: int = 5) -> float:
    """Median over `runs` (after a warm-up) of the mean milliseconds per greedy token; prompt ids [1, T]."""
    times = []
    for run in range(runs + 1):
        logp, past = step(prompt, None)
        tok = logp.argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logp, past = step(tok, past)
            tok = logp.argmax(-1, keepdim=True)
        if run:
            times.append((time.perf_counter() - start) * 1e3 / new_tokens)
    return statistics.median(times)


def compare(
    base_dir: str | Path,
    memory_dir: str | Path,
    datastore: str | Path | Datastore,
    texts: list[str],
    tune_texts: list[str] | None = None,
    k: int = 1024,
    temperature: float = 16.0,
    knn_lmbda: float | None = None,
    block_size: int = 128,
    stride: int = 64,
    new_tokens: int = 32,
    write_mixing: bool = False,
) -> dict:
    """Perplexity on `texts` and decoding latency of the base, the kNN-LM and the memory.

    Perplexities follow :func:`memdec_fast.eval.perplexity.perplexity`'s protocol
    (the base's and the memory's come from it).

    Parameters
    ----------
    base_dir, memory_dir : path
        The base and the memory, a Memory Decoder or an MLP Memory (its lmbda and knn_temp come from its
        memdec_config.json, see :func:`memdec_fast.models.checkpoint.read_mixing`).
    datastore : path or Datastore
        The base's datastore over the memory's training corpus, for the kNN-LM.
    texts : list[str]
        Held-out documents (lines).
    tune_texts : list[str], optional
        Documents to choose the kNN-LM's lmbda on when `knn_lmbda` is None (else 0.25);
        with `write_mixing`, also the memory's lmbda (at its knn_temp).
    write_mixing : bool
        Write the memory's tuned lmbda and knn_temp to its memdec_config.json
        (only with `tune_texts`).
    k, temperature : kNN-LM search settings.
    block_size, stride : the perplexity windows.
    new_tokens : tokens generated per latency run.

    Returns
    -------
    dict
        ``rows``: one dict per method with ``method``, ``ppl``, ``ms_per_token``, ``lmbda``; and the settings.

    Example
    -------
    >>> print(format_table(compare("base/", "memory/", "ds/", texts)))  # doctest: +SKIP
    """
    from memdec_fast.eval.data import load_tokens
    from memdec_fast.eval.perplexity import perplexity

    for name, value in (("k", k), ("temperature", temperature), ("new_tokens", new_tokens)):
        ranges.check(f"compare.{name}", value)
    if knn_lmbda is not None:
        ranges.check("compare.knn_lmbda", knn_lmbda)
    if not texts:
        raise ValueError("no held-out text to score")
    base, tok = load_lm(base_dir), load_tokenizer(base_dir)
    mix = read_mixing(memory_dir)
    if write_mixing and tune_texts:
        mix = tune_mixing(base_dir, memory_dir, tune_texts, (mix["knn_temp"],), block_size=block_size, stride=stride)
        save_mixing(memory_dir, mix["lmbda"], mix["knn_temp"], tuned_on=f"{len(tune_texts)} documents (train compare)",
                    tune_ppl=mix["tune_ppl"])
    knn = KNNLM(base, datastore, k=k, temperature=temperature, lmbda=0.5)
    if knn_lmbda is None:
        knn_lmbda = best_lmbda(*windowed_logprobs(knn.score, load_tokens(as_lines(tune_texts), tok), block_size,
                                                  stride)) if tune_texts else 0.25
    knn.lmbda = knn_lmbda
    tokens = load_tokens(as_lines(texts), tok)
    lp_base, lp_knn = windowed_logprobs(knn.score, tokens, block_size, stride)
    ppl = perplexity(str(base_dir), str(memory_dir), as_lines(texts), lmbda=mix["lmbda"], knn_temp=mix["knn_temp"],
                     block_size=block_size, stride=stride, device="cpu", progress=False)
    prompt = tokens[None, :16]
    name, memory_step = _memory_step(base, memory_dir, mix["lmbda"], mix["knn_temp"])
    rows = [
        {"method": "base", "ppl": ppl.base_ppl, "lmbda": 0.0,
         "ms_per_token": ms_per_token(_lm_step(base), prompt, new_tokens)},
        {"method": "kNN-LM", "ppl": mixture_ppl(lp_base, lp_knn, knn_lmbda), "lmbda": knn_lmbda,
         "ms_per_token": ms_per_token(knn.step, prompt, new_tokens)},
        {"method": name, "ppl": ppl.joint_ppl[mix["lmbda"]], "lmbda": mix["lmbda"],
         "ms_per_token": ms_per_token(memory_step, prompt, new_tokens)},
    ]
    return {"rows": rows, "tokens_scored": ppl.tokens, "datastore_keys": int(knn.ds.keys.shape[0]),
            "k": knn.k, "knn_temperature": temperature, "memory_knn_temp": mix["knn_temp"],
            "block_size": block_size, "stride": stride, "new_tokens": new_tokens,
            "memory_mixing_written": bool(write_mixing and tune_texts), "compiled_ops": ops.compiled_available()}


def format_table(result: dict) -> str:
    """A Markdown table of :func:`compare`'s rows."""
    lines = ["| method | lmbda | PPL | ms / token |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['lmbda']:.2f} | {r['ppl']:.2f} | {r['ms_per_token']:.2f} |"
              for r in result["rows"]]
    return "\n".join(lines)
