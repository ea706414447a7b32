"""JointGenerator: a synchronous front that generates from a base causal LM mixed with a memory.

At each step both models read the same tokens and the next token is drawn from::

    p = (1 - lmbda) * softmax(base_logits / base_temp) + lmbda * softmax(mem_logits / knn_temp)

by :func:`memdec_fast.ops.sample` (greedy or HF-style temperature / top-k /
top-p / min-p sampling). A lean pair decodes on the Engine's step (:mod:`memdec_fast.engine.step`), one
cache slot per prompt; a pair in transformers takes the fallback path (:mod:`memdec_fast.generation.sessions`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from memdec_fast.engine.step import ModelStep, batch_bucket, length_bucket
from memdec_fast.engine.threads import ThreadGovernor
from memdec_fast.generation import hf_args
from memdec_fast.generation.outputs import Ending, GenerationResult, Row
from memdec_fast.generation.requests import (
    Prompts,
    check_one_prompt,
    check_prompt_length,
    check_request,
    encode_prompts,
    parse_stop,
    sampling_params,
)
from memdec_fast.generation.sessions import EagerSampler, SlotSession, TransformersSession
from memdec_fast.models.pair import ModelPair
from memdec_fast.ops.params import Param

__all__ = ["GenerationResult", "JointGenerator"]  # GenerationResult: from memdec_fast.generation.outputs


class JointGenerator:
    """A base causal LM and its memory (Memory Decoder or MLP Memory), generating together.

    Parameters
    ----------
    base : memdec_fast.models.GPT2 or Llama, or a transformers causal LM (or a runner)
    memory : a causal LM of the same kind (Memory Decoder), or memdec_fast.models.MLPMemory
    tokenizer : the base's Hugging Face tokenizer; mixing is over its len(tokenizer) tokens
    lmbda : float
        Weight of the memory in [0, 1].
    knn_temp, base_temp : float
        Softmax temperatures of the memory and of the base.
    reference : bool
        Sample with :mod:`memdec_fast.reference` instead of the fused ops.
    cuda_graphs : bool
        On CUDA, replay each decode step as a CUDA graph (see
        :mod:`memdec_fast.engine.step`); unsupported setups decode
        eagerly after one log line. No effect on the CPU.

    Attributes
    ----------
    pair : the ModelPair it generates from
    tokenizer : the tokenizer
    device : torch.device of both models
    max_context : int, the positions both models take

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
        self._bind(ModelPair(base, memory, tokenizer, lmbda, knn_temp, base_temp, reference), cuda_graphs)

    @classmethod
    def from_pair(cls, pair: ModelPair, cuda_graphs: bool = True) -> JointGenerator:
        """A generator over an already loaded :class:`memdec_fast.models.pair.ModelPair`."""
        gen = cls.__new__(cls)
        gen._bind(pair, cuda_graphs)
        return gen

    def _bind(self, pair: ModelPair, cuda_graphs: bool) -> None:
        self.pair, self.cuda_graphs = pair, cuda_graphs
        self.base, self.memory, self.is_mlp, self.reference = pair.base, pair.memory, pair.is_mlp, pair.reference
        self.tokenizer, self.vocab, self.device, self.max_context = pair.tokenizer, pair.vocab, pair.device, \
            pair.max_context
        self.lmbda, self.knn_temp, self.base_temp = pair.lmbda, pair.knn_temp, pair.base_temp
        tok = self.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
        self._turn = threading.Lock()  # held by the one call that owns the caches
        self._owner: int | None = None  # thread id of that call
        self._step: ModelStep | None = None  # lean pairs: the decode step, grown to the largest call so far

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, memory: str | os.PathLike, *, cuda_graphs: bool = True,
                        **load) -> JointGenerator:
        """Load a base and its memory from local directories or hub names.

        Parameters
        ----------
        base, memory : str or PathLike
            Checkpoints. GPT-2 and Llama-family (llama, qwen2, mistral) bases and Memory
            Decoders run on memdec_fast's lean models; other architectures, and Llama-family
            configs the lean models refuse, fall back to transformers.
        cuda_graphs : bool
            On CUDA, replay decode steps as CUDA graphs where supported.
        **load :
            memory_type ("auto", "decoder" or "mlp"), lmbda, knn_temp (default: the values stored
            with the memory, else 0.55 and 1.0), base_temp, device, dtype, tokenizer, reference:
            see :meth:`memdec_fast.models.pair.ModelPair.from_pretrained`.

        Example
        -------
        >>> gen = JointGenerator.from_pretrained("gpt2-xl", "path/to/mlp_memory", memory_type="mlp", lmbda=0.3)
        """
        return cls.from_pair(ModelPair.from_pretrained(base, memory, **load), cuda_graphs)

    # -- scoring ----------------------------------------------------------------------------------

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
        if input_ids.dim() != 2 or input_ids.shape[1] > self.max_context or input_ids.numel() == 0:
            raise ValueError(f"input_ids: expected [B, T] with 1 <= T <= {self.max_context}, got "
                             f"{list(input_ids.shape)}")
        if last is not None and not 1 <= last <= input_ids.shape[1]:
            raise ValueError(f"last: {last} must lie in [1, {input_ids.shape[1]}]")
        ids = input_ids.to(self.device)
        with self._exclusive():
            return self.pair.forward(ids, last)

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

    def _session(self, rows: list[list[int]], length: int, params: dict[str, Param], seed: int | None,
                 penalty: float) -> SlotSession | TransformersSession:
        """The decode path of this call: the engine's decode step for a lean pair, else the transformers one."""
        if not self.pair.lean:
            rng = None if seed is None else torch.Generator("cpu").manual_seed(seed)
            return TransformersSession(self.pair, rows, length, self._pad_id,
                                       EagerSampler(self.pair, rows, params, rng, penalty))
        step = self._step
        if step is None or len(rows) > step.max_batch or length > step.context:
            slots = batch_bucket(len(rows), 1 << 62)
            context = length_bucket(length, self.max_context)
            if step is not None:
                slots, context = max(slots, step.max_batch), max(context, step.context)
            self._step = step = None  # the old caches go before the new ones are allocated
            self._step = step = ModelStep(self.pair, context, slots, self.cuda_graphs)
        eager = None
        if seed is not None or penalty != 1.0:
            eager = EagerSampler(self.pair, rows, params, None if seed is None else step.new_rng(seed), penalty)
        return SlotSession(step, rows, length, params, eager)

    def _steps(self, rows: list[list[int]], ending: Ending, params: dict[str, Param], seed: int | None,
               out: list[Row], penalty: float = 1.0) -> Iterator[None]:
        """The decode loop: fills `out` one token per live row per step, and yields after each step.

        It owns the caches (:meth:`_exclusive`) from its first step until it ends or is closed.
        Finished rows are skipped; once half or fewer of the computed rows are live, the finished
        ones leave the batch.
        """
        with self._exclusive():
            length = max(len(r) for r in rows) + ending.max_new_tokens - 1  # the last token needs no forward
            session = self._session(rows, length, params, seed, penalty)
            # on the CPU, this (the caller's) thread's steps run on the cores other processes leave free
            governor = ThreadGovernor() if self.pair.device.type == "cpu" else None
            try:
                live = list(range(len(rows)))  # original index of each computed row
                tokens, logprobs = session.start()
                for step in range(ending.max_new_tokens):
                    if governor is not None:
                        governor.update()
                    for r, t, lp in zip(live, tokens, logprobs):
                        if out[r].finish_reason is not None:
                            continue
                        if t < 0:
                            raise RuntimeError(f"prompt {r}: the models produced NaN or infinite logits at step {step}")
                        out[r].add(t, lp, ending, self.tokenizer)
                    yield
                    keep = [i for i, r in enumerate(live) if out[r].finish_reason is None]
                    if not keep:
                        return
                    if len(keep) <= len(live) // 2:
                        session.keep_rows(keep)
                        live, tokens = [live[i] for i in keep], [tokens[i] for i in keep]
                    tokens, logprobs = session.step_rows(tokens)
            finally:
                session.close()
                if governor is not None:
                    governor.restore()

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
        check_prompt_length(max(len(r) for r in rows), max_new_tokens, self.max_context)
        params = sampling_params(
            len(rows), self.device, lmbda=self.lmbda if lmbda is None else lmbda, knn_temp=self.knn_temp,
            base_temp=self.base_temp, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        )
        stop_ids, stop_strings = parse_stop(stop, self.tokenizer, self.vocab)
        ending = Ending(max_new_tokens, frozenset(stop_ids), tuple(stop_strings), self.tokenizer.eos_token_id,
                        track_text or bool(stop_strings))
        out = [Row() for _ in rows]
        return out, stop_strings, self._steps(rows, ending, params, seed, out, penalty)

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
            Each prompt decodes in a cache slot of its own, at its own length; each gets
            the same greedy tokens it would get alone.
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
        out, _, steps = self._start(
            prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop, lmbda, False, do_sample,
            max_length, repetition_penalty, num_return_sequences,
        )
        for _ in steps:
            pass
        return GenerationResult.of(out)

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


def _repeat_rows(value, n: int):
    """A per-prompt parameter (list or tensor [B]) repeated for n sequences per prompt; scalars as they are."""
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(n) if value.dim() == 1 else value
    if isinstance(value, (list, tuple)):
        return [v for v in value for _ in range(n)]
    return value
