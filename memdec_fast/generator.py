"""JointGenerator: generate from a base causal LM mixed with a memory.

At each step both models read the same tokens and the next token is drawn from::

    p = (1 - lmbda) * softmax(base_logits / base_temp) + lmbda * softmax(mem_logits / knn_temp)

by :func:`memdec_fast.ops.sample` (greedy or HF-style temperature / top-k /
top-p / min-p sampling).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from memdec_fast import ops, reference
from memdec_fast.generation import checks, cuda_graph, hf_args
from memdec_fast.generation.penalty import RepetitionPenalty
from memdec_fast.generation.requests import (
    Prompts,
    check_one_prompt,
    check_prompt_length,
    check_request,
    encode_prompts,
    left_pad,
    parse_stop,
    sampling_params,
    select_rows,
)
from memdec_fast.generation.text import Row
from memdec_fast.models import MLPMemory, as_runner, checkpoint, load_causal_lm
from memdec_fast.params import Param, check_params

__all__ = ["GenerationResult", "JointGenerator"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class GenerationResult:
    """Output of :meth:`JointGenerator.generate`, one entry per prompt.

    token_ids holds every generated token, including the EOS or stop token that
    ended a row; logprobs holds log p of each under the (unfiltered) mixture;
    texts is their decoding without special tokens, cut before a stop string.
    finish_reasons: "length", "stop" (a stop string or a stop token id) or "eos" (the
    tokenizer's EOS token). With num_return_sequences=n, each prompt's n results are
    consecutive.
    """

    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]


class JointGenerator:
    """A base causal LM and its memory (Memory Decoder or MLP Memory), generating together.

    Parameters
    ----------
    base : memdec_fast.models.GPT2 or a transformers causal LM (or a runner)
    memory : a causal LM (Memory Decoder), or memdec_fast.models.MLPMemory
    tokenizer : the base's Hugging Face tokenizer; mixing is over its len(tokenizer) tokens
    lmbda : float
        Weight of the memory in [0, 1].
    knn_temp, base_temp : float
        Softmax temperatures of the memory and of the base.
    reference : bool
        Sample with :mod:`memdec_fast.reference` instead of the fused ops.
    cuda_graphs : bool
        On CUDA, replay each decode step as a CUDA graph (see
        :mod:`memdec_fast.generation.cuda_graph`); unsupported setups decode
        eagerly after one log line. No effect on the CPU.

    Attributes
    ----------
    tokenizer : the tokenizer
    device : torch.device of both models
    max_context : int, the base's context window in tokens

    Notes
    -----
    One call owns the models' caches from its start to its end. Calls from several
    threads take turns (each waits for the one before to finish); a second call in the
    thread that holds a stream() still open raises RuntimeError at once. To serve
    many callers at once, use :class:`memdec_fast.Engine`.

    Example
    -------
    >>> gen = JointGenerator.from_pretrained("gpt2", "Clover-Hill/MemoryDecoder-gpt2-small", lmbda=0.25)
    >>> gen.generate("The patient was given", max_new_tokens=20).texts[0]
    """

    def __init__(
        self, base, memory, tokenizer, lmbda: float, knn_temp: float = 1.0, base_temp: float = 1.0,
        reference: bool = False, cuda_graphs: bool = True,
    ):
        check_params(1, lmbda=lmbda, knn_temp=knn_temp, base_temp=base_temp)
        self.base = as_runner(base)
        self.is_mlp = isinstance(memory, MLPMemory)
        self.memory = memory if self.is_mlp else as_runner(memory)
        self.tokenizer, self.vocab = tokenizer, len(tokenizer)
        self.lmbda, self.knn_temp, self.base_temp, self.reference = lmbda, knn_temp, base_temp, reference
        self.device = self.base.device
        mem_rows = memory.config.vocab_size if self.is_mlp else self.memory.vocab_size
        checks.check_vocab(self.vocab, self.base.vocab_size, mem_rows, "MLP Memory" if self.is_mlp else "memory")
        if self.is_mlp:
            checks.check_layer_position(memory.layer_position, self.base.num_layers)
            checks.check_hidden_size(memory.input_dim, self.base.hidden_size)
            mem_device = memory.lm_head.weight.device
        else:
            mem_device = self.memory.device
        if mem_device != self.device:
            raise ValueError(f"memory: on {mem_device}, but the base is on {self.device}")
        self.base.hidden_layer = memory.layer_position if self.is_mlp else None
        self.max_context = self.base.max_context
        self._context = self.max_context if self.is_mlp else min(self.max_context, self.memory.max_context)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" and not self.is_mlp else None
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self._turn = threading.Lock()  # held by the one call that owns the caches
        self._owner: int | None = None  # thread id of that call
        self._graphs = None
        if cuda_graphs:
            self._graphs = cuda_graph.decode_graphs(self.base, self.memory, self.vocab, self._context, self._side,
                                                    reference)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        memory: str | os.PathLike,
        memory_type: str = "auto",
        lmbda: float | None = None,
        knn_temp: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tokenizer=None,
        reference: bool = False,
        base_temp: float = 1.0,
        cuda_graphs: bool = True,
    ) -> JointGenerator:
        """Load a base and its memory from local directories or hub names.

        Parameters
        ----------
        base, memory : str or PathLike
            Checkpoints. GPT-2 and Llama-family (llama, qwen2, mistral) bases and
            Memory Decoders run on memdec_fast's lean models; other architectures,
            and Llama-family configs the lean models refuse, fall back to transformers.
        memory_type : "auto", "decoder" or "mlp"
            "auto" picks "mlp" when an mlp_memory_config.json sits beside or above
            the weights, or the weights hold MLP blocks without attention.
        lmbda, knn_temp : float, optional
            Mixture weight of the memory and its softmax temperature; by default the
            values stored with the memory (memdec_config.json, written by
            memdec_fast.train), else 0.55 and 1.0.
        base_temp : float
            Softmax temperature of the base.
        device : default "cuda" when available, else "cpu"
        dtype : float32, float16 or bfloat16; default bfloat16 on CUDA, float32 on the CPU
        tokenizer : default the base's own
        reference : bool
            Run transformers models and the reference ops (slow; for tests and comparisons).
        cuda_graphs : bool
            On CUDA, replay decode steps as CUDA graphs where supported.

        Example
        -------
        >>> gen = JointGenerator.from_pretrained("gpt2-xl", "path/to/mlp_memory", memory_type="mlp", lmbda=0.3)
        """
        checks.check_memory_type(memory_type)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        lmbda, knn_temp = checkpoint.mixing_defaults(memory, lmbda, knn_temp)
        check_params(1, lmbda=lmbda, knn_temp=knn_temp, base_temp=base_temp)
        for path in (base, memory):  # fail on missing, mismatched or hostile files before any weights load
            checkpoint.check_config_against_weights(path)
        tokenizer = tokenizer or checks.load_tokenizer(base)
        checks.check_tokenizers(tokenizer, memory)
        memory_type = checks.resolve_memory_type(memory, memory_type)
        base_runner = load_causal_lm(base, device, dtype, lean=not reference)
        if memory_type == "mlp":
            mem = MLPMemory.from_pretrained(memory, device=device, dtype=dtype)
        else:
            mem = load_causal_lm(memory, device, dtype, lean=not reference)
        return cls(base_runner, mem, tokenizer, lmbda, knn_temp, base_temp, reference, cuda_graphs)

    # -- model passes -------------------------------------------------------------------------

    def _both(self, method: str, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """Call runner `method` on both models, and return their logits cut to the tokenizer's vocabulary.

        An MLP Memory reads the base's hidden state. On CUDA a Memory Decoder runs
        on a side stream, joined to the main one by an event before sampling.
        """
        base_pass = partial(getattr(self.base, method), *args)
        if self.is_mlp:
            base_logits, hidden = base_pass()
            return base_logits[..., : self.vocab], self.memory(hidden)[..., : self.vocab]
        mem_pass = partial(getattr(self.memory, method), *args)
        if self._side is None:
            return base_pass()[0][..., : self.vocab], mem_pass()[0][..., : self.vocab]
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            mem_logits = mem_pass()[0]
            done = torch.cuda.Event()
            done.record(self._side)
        base_logits = base_pass()[0]
        main.wait_event(done)
        mem_logits.record_stream(main)
        return base_logits[..., : self.vocab], mem_logits[..., : self.vocab]

    def _on_side(self, fn) -> None:
        """Run `fn` on the memory's stream (where its cache lives), after the main stream's work."""
        if self._side is None:
            fn()
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            fn()

    @torch.inference_mode()
    def score_logits(self, input_ids: torch.Tensor, last: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' logits for full, unpadded windows: one forward each, no cache.

        Parameters
        ----------
        input_ids : LongTensor [B, T], T <= max_context
        last : int, optional
            Only the logits of the last `last` positions (T' = last), e.g. the
            scored tail of a perplexity window; default all T.

        Returns
        -------
        (base_logits, mem_logits) : Tensors [B, T', V], V = len(tokenizer)
            Possibly strided views (padded vocabulary rows dropped).

        Example
        -------
        >>> base_logits, mem_logits = gen.score_logits(torch.tensor([[464, 3290, 318]]))
        """
        if input_ids.dim() != 2 or input_ids.shape[1] > self._context or input_ids.numel() == 0:
            raise ValueError(f"input_ids: expected [B, T] with 1 <= T <= {self._context}, got {list(input_ids.shape)}")
        if last is not None and not 1 <= last <= input_ids.shape[1]:
            raise ValueError(f"last: {last} must lie in [1, {input_ids.shape[1]}]")
        ids = input_ids.to(self.device)
        with self._exclusive():
            return self._both("forward", ids, last)

    # -- generation ---------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Own the models and their caches for one call: other threads wait; this thread may not nest."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(
                "JointGenerator is busy: a stream() of this generator is still open in this thread; exhaust or "
                "close() it first (one call owns the caches at a time; memdec_fast.Engine serves concurrent requests)"
            )
        with self._turn:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _steps(
        self, rows: list[list[int]], max_new_tokens: int, params: dict[str, Param], seed: int | None,
        stop_ids: set[int], out: list[Row], track_text: bool, stop: list[str], penalty: float = 1.0,
    ) -> Iterator[None]:
        """The decode loop: fills `out` one token per live row per step, and yields after each step.

        It owns the caches (:meth:`_exclusive`) from its first step until it ends or is closed.
        Finished rows are skipped; once half or fewer of the computed rows are live, the finished
        ones leave the batch (caches shrink).
        """
        with self._exclusive():
            ids, mask = left_pad(rows, self._pad_id, self.device)
            length = ids.shape[1] + max_new_tokens - 1  # cache slots: the last token needs no forward
            live = list(range(len(rows)))  # original index of each computed batch row
            session = None
            if self._graphs is not None and penalty == 1.0:
                session = self._graphs.session(len(rows), length, params, seed, partial(self._both, "prefill"))
            pen = None if penalty == 1.0 else RepetitionPenalty(rows, self.vocab, penalty, self.device,
                                                                reference if self.reference else ops)
            session = session or _EagerSession(self, params, seed, length, pen)
            tokens, logprobs = session.start(ids, mask)
            for step in range(max_new_tokens):
                for r, t, lp in zip(live, tokens.tolist(), logprobs.tolist()):
                    row = out[r]
                    if row.finish_reason is not None:
                        continue
                    if t < 0:
                        raise RuntimeError(f"prompt {r}: the models produced NaN or infinite logits at step {step}")
                    row.token_ids.append(t)
                    row.logprobs.append(lp)
                    if track_text:
                        row.update_text(self.tokenizer, stop)
                    if row.finish_reason is None and t in stop_ids:
                        row.finish_reason = "eos" if t == self.tokenizer.eos_token_id else "stop"
                    if row.finish_reason is None and step == max_new_tokens - 1:
                        row.finish_reason = "length"
                yield
                keep = [i for i, r in enumerate(live) if out[r].finish_reason is None]
                if not keep:
                    return
                if len(keep) <= len(live) // 2:
                    idx = torch.tensor(keep, device=self.device)
                    session.keep_rows(idx)
                    live, tokens = [live[i] for i in keep], tokens[idx]
                tokens, logprobs = session.step(tokens)

    def _start(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop, lmbda, track_text,
               do_sample=None, max_length=None, repetition_penalty=1.0, num_return_sequences=1):
        rows = encode_prompts(prompts, self.tokenizer, self.vocab)
        n = hf_args.check_num_return_sequences(num_return_sequences)
        penalty = hf_args.check_repetition_penalty(repetition_penalty)
        temperature = hf_args.resolve_temperature(temperature, do_sample)
        max_new_tokens = hf_args.resolve_length(max_new_tokens, max_length, max(len(r) for r in rows))
        if n > 1:
            rows = [r for r in rows for _ in range(n)]
            temperature, top_k, top_p, min_p, lmbda = (
                _repeat_rows(v, n) for v in (temperature, top_k, top_p, min_p, lmbda)
            )
        check_request(max_new_tokens, seed)
        check_prompt_length(max(len(r) for r in rows), max_new_tokens, self._context)
        params = sampling_params(
            len(rows), self.device, lmbda=self.lmbda if lmbda is None else lmbda, knn_temp=self.knn_temp,
            base_temp=self.base_temp, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        )
        stop_ids, stop_strings = parse_stop(stop, self.tokenizer, self.vocab)
        out = [Row() for _ in rows]
        track = track_text or bool(stop_strings)
        steps = self._steps(rows, max_new_tokens, params, seed, stop_ids, out, track, stop_strings, penalty)
        return out, stop_strings, steps

    def generate(
        self,
        prompts: Prompts,
        max_new_tokens: int | None = None,
        temperature: Param | Sequence[float] | None = None,
        top_k: Param | Sequence[int] = 0,
        top_p: Param | Sequence[float] = 1.0,
        min_p: Param | Sequence[float] = 0.0,
        seed: int | None = None,
        stop: int | str | Sequence[int | str] | None = None,
        lmbda: Param | Sequence[float] | None = None,
        *,
        do_sample: bool | None = None,
        max_length: int | None = None,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
        **unsupported,
    ) -> GenerationResult:
        """Generate up to max_new_tokens tokens for each prompt.

        Parameters
        ----------
        prompts : str, list of str, list of token ids, list of lists, or LongTensor [B, T]
            Prompts of different lengths are left-padded; each gets the same greedy
            tokens it would get alone.
        max_new_tokens : int, default 32
            Exactly this many tokens per prompt, unless EOS or a stop comes first.
        temperature, top_k, top_p, min_p :
            HF-style sampling on the mixture; temperature 0 (the default) is greedy.
            Each takes one value, or one per prompt.
        seed : int, optional
            Same seed, same tokens.
        stop : token id, string, or a list of them
            A row ends after a stop id (kept in token_ids) or a stop string (cut from the text).
        lmbda : float, or one per prompt; default the constructor's
        do_sample, max_length, repetition_penalty, num_return_sequences :
            As in Hugging Face generate: do_sample=False is greedy and do_sample=True
            samples (at temperature 1 unless given); max_length counts the longest
            prompt too; repetition_penalty scales the mixture's log p of tokens already
            in the row; each prompt gives num_return_sequences consecutive results.
            Other HF arguments raise TypeError saying what to use instead.

        Returns
        -------
        GenerationResult

        Example
        -------
        >>> res = gen.generate(["Hello", "The cat"], max_new_tokens=8, temperature=0.7, top_p=0.9, seed=0)
        >>> res.texts, res.token_ids, res.logprobs
        """
        hf_args.refuse_unknown("generate", unsupported)
        out, stop_strings, steps = self._start(
            prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop, lmbda, False, do_sample,
            max_length, repetition_penalty, num_return_sequences,
        )
        for _ in steps:
            pass
        for row in out:
            if not stop_strings or row.finish_reason != "stop":  # a row cut by a stop string already has its text
                row.update_text(self.tokenizer, stop_strings)
        return GenerationResult(
            [r.text for r in out], [r.token_ids for r in out], [r.logprobs for r in out], [r.finish_reason for r in out]
        )

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int | None = None, **kwargs) -> Iterator[str]:
        """Yield one prompt's text as it is produced; the pieces join to generate()'s text.

        Takes the same keyword arguments as :meth:`generate` (num_return_sequences 1). A piece is held back
        while it may still change: a UTF-8 character split across tokens, or the
        start of a stop string.

        Example
        -------
        >>> for piece in gen.stream("Once upon a time", max_new_tokens=50):
        ...     print(piece, end="", flush=True)
        """
        check_one_prompt(prompt)
        args = {k: kwargs.pop(k, d) for k, d in
                (("temperature", None), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0), ("seed", None), ("stop", None),
                 ("lmbda", None), ("do_sample", None), ("max_length", None), ("repetition_penalty", 1.0))}
        if kwargs.pop("num_return_sequences", 1) != 1:
            raise ValueError("num_return_sequences: stream() yields one sequence; use generate() for several")
        hf_args.refuse_unknown("stream", kwargs)
        out, stop_strings, steps = self._start(prompt, max_new_tokens, track_text=True, **args)
        sent = 0
        for _ in steps:
            text = out[0].stable_text(stop_strings)
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)


class _EagerSession:
    """The decode loop's passes without graphs: one eager forward per model and step, then the sampler.

    The same interface as :class:`memdec_fast.generation.cuda_graph.GraphSession`.
    """

    def __init__(self, gen: JointGenerator, params: dict[str, Param], seed: int | None, length: int,
                 penalty: RepetitionPenalty | None = None):
        self.gen, self.params, self.length = gen, params, length
        self.sample = penalty or (reference.sample if gen.reference else ops.sample)
        self.penalty = penalty
        self.rng = None
        if seed is not None:
            on_device = gen.device.type == "cuda" and ops.compiled_available() and not gen.reference
            self.rng = torch.Generator(gen.device if on_device else "cpu").manual_seed(seed)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(*self.gen._both("prefill", input_ids, attention_mask, self.length), **self.params,
                           generator=self.rng)

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a finished row still in the batch may have sampled -1 (NaN logits); it must still embed (a live row's -1
        # never gets here: _steps raises first)
        return self.sample(*self.gen._both("decode", tokens.clamp_min(0)), **self.params, generator=self.rng)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.gen.base.keep_rows(rows)
        if not self.gen.is_mlp:
            self.gen._on_side(partial(self.gen.memory.keep_rows, rows))
        self.params = select_rows(self.params, rows)
        if self.penalty is not None:
            self.penalty.keep_rows(rows)


def _repeat_rows(value, n: int):
    """A per-prompt parameter (list or tensor [B]) repeated for n sequences per prompt; scalars as they are."""
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(n) if value.dim() == 1 else value
    if isinstance(value, (list, tuple)):
        return [v for v in value for _ in range(n)]
    return value
