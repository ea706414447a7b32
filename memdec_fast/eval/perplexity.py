"""Perplexity of a base LM, its memory, and their mixture, with a lambda sweep in one pass.

The protocol is upstream's sliding window (Memory Decoder's ``evaluate_joint.py``),
stated exactly. Take the N tokens of the data. Window w covers tokens
``[max(0, (w+1)*stride - block_size), min((w+1)*stride, N))`` and scores the tokens
at positions ``[w*stride, min((w+1)*stride, N))``, each predicted from the tokens
before it inside the window. Position 0 has no context and is not scored, so every
other token is scored exactly once, and past the first window each has at least
``block_size - stride`` tokens of context. With ``stride == block_size`` the windows
are disjoint (Hugging Face's no-overlap recipe): the first token of each window has
no context inside it and is not scored either.

Because the models are causal, the windows that start at token 0 all see the same
context for a given position; they are run as one forward.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from memdec_fast import ops, ranges
from memdec_fast.eval.data import EvalData, check_data, load_tokens
from memdec_fast.models.checkpoint import mixing_defaults
from memdec_fast.models.pair import ModelPair

__all__ = ["PerplexityResult", "perplexity", "plan_windows"]

# Without the compiled kernel, target_logprobs runs the float64 reference, which
# holds a few [rows, V] temporaries: feed it rows in slices of about this many elements.
_REFERENCE_CHUNK_ELEMS = 1 << 21


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexities over the scored tokens.

    Attributes
    ----------
    tokens : int
        Number of tokens scored (N - 1; fewer with disjoint windows, stride == block_size).
    base_ppl, memory_ppl : float
        Perplexity of the base LM alone and of the memory alone.
    joint_ppl : dict[float, float]
        Perplexity of the mixture for each lambda asked for.
    """

    tokens: int
    base_ppl: float
    memory_ppl: float
    joint_ppl: dict[float, float]

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``{"tokens", "base_ppl", "memory_ppl", "joint_ppl": {"0.55": ppl, ...}}``."""
        return {
            "tokens": self.tokens,
            "base_ppl": self.base_ppl,
            "memory_ppl": self.memory_ppl,
            "joint_ppl": {repr(float(lm)): ppl for lm, ppl in self.joint_ppl.items()},
        }


@dataclass(frozen=True)
class Span:
    """One forward: tokens [begin, end) are fed, tokens [first, end) are scored."""

    begin: int
    end: int
    first: int


def plan_windows(n: int, block_size: int, stride: int) -> list[Span]:
    """The forwards that score tokens 1..n-1 under the sliding-window protocol: one per window.

    Windows that start at token 0 could share one forward (the models are causal),
    but each scores only its own `stride` tokens, so that no forward needs logits
    for more than `stride` positions: peak memory stays at 2 x stride x V floats.

    Example
    -------
    >>> plan_windows(2000, 1024, 512)
    [Span(begin=0, end=512, first=1), Span(begin=0, end=1024, first=512), Span(begin=512, end=1536, first=1024), Span(begin=1024, end=2000, first=1536)]
    """
    begins = [max(0, (w + 1) * stride - block_size) for w in range(math.ceil(n / stride))]
    # a window's first token has no context inside it: it is scored only by an earlier, overlapping window
    spans = (Span(b, min((w + 1) * stride, n), max(b + 1, w * stride)) for w, b in enumerate(begins))
    return [s for s in spans if s.first < s.end]  # with stride 1, window 0 scores nothing


def _batches(spans: list[Span], batch_size: int) -> Iterator[list[Span]]:
    """Consecutive spans of equal length, at most batch_size at a time."""
    group: list[Span] = []
    for s in spans:
        if group and (len(group) == batch_size or s.end - s.begin != group[0].end - group[0].begin):
            yield group
            group = []
        group.append(s)
    if group:
        yield group


class _Sums:
    """Negative log-likelihood sums in float64, one per model and one per lambda."""

    def __init__(self, lmbdas: list[float], knn_temp: float, device: torch.device):
        self.lmbdas = lmbdas
        self.knn_temp = knn_temp
        self.lm = torch.tensor(lmbdas, dtype=torch.float64, device=device).unsqueeze(1)  # [L, 1]
        self.log_w_base = torch.log1p(-self.lm)  # log(0) = -inf where lmbda == 1
        self.log_w_mem = torch.log(self.lm)
        self.base = torch.zeros((), dtype=torch.float64, device=device)
        self.mem = torch.zeros((), dtype=torch.float64, device=device)
        self.joint = torch.zeros(len(lmbdas), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, base_logits: torch.Tensor, mem_logits: torch.Tensor, targets: torch.Tensor) -> None:
        # base_logits, mem_logits: [n, V] (rows may be strided); targets: [n]
        n, vocab = base_logits.shape
        rows = n if ops.compiled_available() else max(1, _REFERENCE_CHUNK_ELEMS // vocab)
        for i in range(0, n, rows):
            _, lp_base, lp_mem = ops.target_logprobs(
                base_logits[i : i + rows], mem_logits[i : i + rows], targets[i : i + rows],
                lmbda=self.lmbdas[0], knn_temp=self.knn_temp,
            )
            self._add_logprobs(lp_base.double(), lp_mem.double())
        self.count += n

    def _add_logprobs(self, lp_base: torch.Tensor, lp_mem: torch.Tensor) -> None:
        # lp_base, lp_mem: [n] float64
        self.base -= lp_base.sum()
        self.mem -= lp_mem.sum()
        mixed = torch.logaddexp(self.log_w_base + lp_base, self.log_w_mem + lp_mem)  # [L, n]
        # lmbda 0 and 1 are exactly the single models, even where the other one gives NaN
        joint = torch.where(self.lm == 0, lp_base, torch.where(self.lm == 1, lp_mem, mixed))
        self.joint -= joint.sum(1)

    def result(self) -> PerplexityResult:
        joint = self.joint.tolist()
        return PerplexityResult(
            tokens=self.count,
            base_ppl=math.exp(self.base.item() / self.count),
            memory_ppl=math.exp(self.mem.item() / self.count),
            joint_ppl={lm: math.exp(nll / self.count) for lm, nll in zip(self.lmbdas, joint)},
        )


def _check_lmbdas(lmbda: float | Sequence[float]) -> list[float]:
    values = [lmbda] if isinstance(lmbda, (int, float)) else list(lmbda)
    if not values:
        raise ValueError("lmbda: give at least one value")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"lmbda: {v!r} is outside [0, 1]")
    return [float(v) for v in values]


def _pair(base, memory, memory_type: str, lmbda: float, knn_temp: float, device, dtype, tokenizer) -> ModelPair:
    """The model pair to score: given (a ModelPair, or a JointGenerator's), loaded from paths, or built from
    loaded models."""
    given = getattr(base, "pair", base)
    if isinstance(given, ModelPair):
        if memory is not None or device is not None or dtype is not None or tokenizer is not None:
            raise ValueError("base is a ModelPair or JointGenerator: memory, device, dtype and tokenizer must be None")
        return given
    if memory is None:
        raise ValueError("memory: give a memory (path, hub name or model), or pass a ModelPair or JointGenerator as "
                         "base")
    if isinstance(base, (str, os.PathLike)):
        return ModelPair.from_pretrained(base, memory, memory_type=memory_type, lmbda=lmbda, knn_temp=knn_temp,
                                         device=device, dtype=dtype, tokenizer=tokenizer)
    if tokenizer is None:
        raise ValueError("tokenizer: needed with loaded models")
    if device is not None or dtype is not None:
        raise ValueError("device, dtype: apply only when loading from paths; move loaded models yourself")
    return ModelPair(base, memory, tokenizer, lmbda, knn_temp)


@torch.inference_mode()
def perplexity(
    base,
    memory,
    data: EvalData,
    lmbda: float | Sequence[float] | None = None,
    knn_temp: float | None = None,
    block_size: int | None = None,
    stride: int | None = None,
    memory_type: str = "auto",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of the base LM, the memory and their mixture on `data`.

    All the joint perplexities of a lambda sweep come from one pass: each scored
    token's log p_base and log p_mem (from :func:`memdec_fast.ops.target_logprobs`,
    softmaxes over the tokenizer's vocabulary, the memory's at `knn_temp`) are mixed
    in float64 for every lambda. No [tokens, V] tensor is held beyond one
    forward's logits.

    Parameters
    ----------
    base : str, PathLike, model, ModelPair or JointGenerator
        Path or hub name of the base LM, or a loaded model (then pass `tokenizer`);
        or a loaded :class:`~memdec_fast.models.pair.ModelPair` (or a
        :class:`~memdec_fast.JointGenerator`, scoring its pair), with memory=None.
    memory : str, PathLike, model, or None
        The memory (Memory Decoder or MLP Memory), as a path or hub name, or loaded.
    data : path, str, list of str, or 1-D token ids
        See :func:`memdec_fast.eval.data.load_tokens`.
    lmbda : float or list of float, optional
        Weight(s) of the memory in the mixture, each in [0, 1]. Default: the value
        stored with the memory (memdec_config.json), else 0.55.
    knn_temp : float, optional
        Softmax temperature of the memory; default as for lmbda, else 1.0.
    block_size, stride : int, optional
        Window length and step of the sliding-window protocol (module docstring);
        0 < stride <= block_size <= the model's context. Defaults: the model's
        context (at most 1024) and half the block size.
    memory_type : {"auto", "decoder", "mlp"}
    batch_size : int, optional
        Windows per forward; default 1 on the CPU (memory-bound), 8 on CUDA.
    device, dtype : optional
        Where and in what precision to load the models given as paths.
    tokenizer : optional
        The base's tokenizer; by default loaded from `base` when it is a path.
    progress : bool
        Show a tqdm bar with tokens/s on stderr.

    Returns
    -------
    PerplexityResult

    Example
    -------
    >>> r = perplexity("gpt2", "Clover-Hill/MemoryDecoder-gpt2-small", "wiki.test.txt", lmbda=[0.25, 0.55])
    >>> r.base_ppl, r.joint_ppl[0.55]
    """
    given = getattr(base, "pair", base)
    if not isinstance(given, ModelPair):
        lmbda, knn_temp = mixing_defaults(memory, lmbda, knn_temp)
    elif lmbda is None or knn_temp is None:
        lmbda = given.lmbda if lmbda is None else lmbda
        knn_temp = given.knn_temp if knn_temp is None else knn_temp
    lmbdas = _check_lmbdas(lmbda)
    if isinstance(knn_temp, bool) or not isinstance(knn_temp, (int, float)) or not knn_temp > 0:
        raise ValueError(f"knn_temp: {knn_temp!r} must be > 0")
    for name, v in (("block_size", block_size), ("stride", stride), ("batch_size", batch_size)):
        if v is not None:
            ranges.check(f"ppl.{name}", v)  # a block of 1 token scores nothing: block_size >= 2
    if block_size is not None and stride is not None and not stride <= block_size:
        raise ValueError(f"stride: {stride} must lie in [1, block_size] = [1, {block_size}]")
    check_data(data)
    pair = _pair(base, memory, memory_type, lmbdas[0], knn_temp, device, dtype, tokenizer)
    block_size = block_size or min(1024, pair.max_context)
    stride = stride or max(1, block_size // 2)
    if block_size > pair.max_context:
        raise ValueError(f"block_size: {block_size} exceeds the model's context of {pair.max_context} tokens")
    if not stride <= block_size:
        raise ValueError(f"stride: {stride} must lie in [1, block_size] = [1, {block_size}]")
    tokens = load_tokens(data, pair.tokenizer)
    vocab = len(pair.tokenizer)
    if tokens.numel() < 2:
        raise ValueError(f"data: {tokens.numel()} token(s); at least 2 are needed to score one")
    if bool(((tokens < 0) | (tokens >= vocab)).any()):
        raise ValueError(f"data: token ids must lie in [0, {vocab})")
    dev = pair.device
    batch_size = batch_size or (8 if dev.type == "cuda" else 1)

    sums = _Sums(lmbdas, float(knn_temp), dev)
    spans = plan_windows(tokens.numel(), block_size, stride)
    with tqdm(total=sum(s.end - s.first for s in spans), unit="tok", unit_scale=True, desc="perplexity", disable=not progress) as bar:
        for group in _batches(spans, batch_size):
            ids = torch.stack([tokens[s.begin : s.end] for s in group]).to(dev)  # [B, T]
            # logits at window position j predict the token at j + 1; only the scored tail is computed
            skip = min(s.first - s.begin for s in group) - 1
            base_logits, mem_logits = pair.forward(ids, last=ids.shape[1] - skip)  # [B, T - skip, V] each
            for row, s in enumerate(group):
                lo, hi = s.first - s.begin, s.end - s.begin
                sums.add(base_logits[row, lo - 1 - skip : hi - 1 - skip], mem_logits[row, lo - 1 - skip : hi - 1 - skip],
                         ids[row, lo:hi])
                bar.update(hi - lo)
            del base_logits, mem_logits  # free before the next forward allocates its own
    return sums.result()
