"""A base and its memory as one unit: loaded and checked together, and run together on their streams.

Everything that decodes or scores (the engine's step, JointGenerator, perplexity) holds a :class:`ModelPair`.
The pair is either *lean* (both models on memdec_fast's GPT-2 / Llama family, or an MLP Memory over a lean
base: the engine's slot caches and CUDA graphs) or *transformers* (both in transformers, each with its own
dynamic cache: the fallback for architectures without a lean model, and ``reference=True``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import torch

from memdec_fast.models import checkpoint, checks
from memdec_fast.models.cache import Packing
from memdec_fast.models.mlp_memory import MLPMemory
from memdec_fast.models.runners import LeanRunner, as_runner, lean_reason, load_causal_lm
from memdec_fast.ops.params import check_params

__all__ = ["DTYPES", "Logits", "ModelPair"]

logger = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Logits = tuple[torch.Tensor, torch.Tensor]
"""(base_logits, mem_logits), the last axis cut to the tokenizer's vocabulary."""


class ModelPair:
    """A base causal LM and its memory (a Memory Decoder or an MLP Memory), with the mixing defaults.

    Parameters
    ----------
    base : memdec_fast GPT2 or Llama, a transformers causal LM, or a runner of one
    memory : a causal LM of the same kinds (a Memory Decoder), or MLPMemory
    tokenizer : the base's tokenizer; mixing is over its len(tokenizer) tokens
    lmbda, knn_temp, base_temp : float
        The memory's weight in [0, 1] and the two softmax temperatures (requests may override lmbda).
    reference : bool
        Sample with :mod:`memdec_fast.ops.reference` instead of the fused ops.

    Attributes
    ----------
    base, memory : the runners (an MLPMemory as it is)
    vocab : int, len(tokenizer)
    device : torch.device of both models
    max_context : int, the positions both models take
    is_mlp : bool, the memory is an MLP Memory (it reads the base's hidden state)
    lean : bool, both run on memdec_fast's lean models (the engine's slot caches)

    Example
    -------
    >>> pair = ModelPair.from_pretrained("gpt2-xl", "Clover-Hill/MemoryDecoder-gpt2-small", lmbda=0.25)
    >>> base_logits, mem_logits = pair.forward(torch.tensor([[464, 3290, 318]]))  # [1, 3, V] each
    """

    def __init__(self, base, memory, tokenizer, lmbda: float, knn_temp: float = 1.0, base_temp: float = 1.0,
                 reference: bool = False):
        check_params(1, lmbda=lmbda, knn_temp=knn_temp, base_temp=base_temp)
        self.base = as_runner(base)
        self.is_mlp = isinstance(memory, MLPMemory)
        self.memory = memory if self.is_mlp else as_runner(memory)
        self.tokenizer, self.vocab = tokenizer, len(tokenizer)
        self.lmbda, self.knn_temp, self.base_temp, self.reference = lmbda, knn_temp, base_temp, reference
        self.device = self.base.device
        kind = "MLP Memory" if self.is_mlp else "memory"
        mem_rows = memory.config.vocab_size if self.is_mlp else self.memory.vocab_size
        checks.check_vocab(self.vocab, self.base.vocab_size, mem_rows, kind)
        if self.is_mlp:
            checks.check_layer_position(memory.layer_position, self.base.num_layers)
            checks.check_hidden_size(memory.input_dim, self.base.hidden_size)
            mem_device = memory.lm_head.weight.device
        else:
            mem_device = self.memory.device
        if mem_device != self.device:
            raise ValueError(f"memory: on {mem_device}, but the base is on {self.device}")
        self.lean = isinstance(self.base, LeanRunner)
        if not self.is_mlp and isinstance(self.memory, LeanRunner) != self.lean:
            raise ValueError("base and memory: one runs on memdec_fast's lean models and the other in transformers; "
                             "pass both as transformers models, or both as memdec_fast models (GPT2, Llama)")
        self.base.hidden_layer = memory.layer_position if self.is_mlp else None
        self.max_context = self.base.max_context if self.is_mlp else min(self.base.max_context,
                                                                          self.memory.max_context)
        decoder_on_cuda = self.device.type == "cuda" and not self.is_mlp
        self._side = torch.cuda.Stream(self.device) if decoder_on_cuda else None

    @classmethod
    def from_pretrained(
        cls, base: str | os.PathLike, memory: str | os.PathLike, memory_type: str = "auto",
        lmbda: float | None = None, knn_temp: float | None = None, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, tokenizer=None, reference: bool = False, base_temp: float = 1.0,
    ) -> ModelPair:
        """Load a base and its memory from local directories or hub names, checking them against each other first.

        Parameters
        ----------
        base, memory : str or PathLike
            GPT-2 and Llama-family (llama, qwen2, mistral) checkpoints run on memdec_fast's lean models.
            When either model has no lean model (another architecture, or a Llama-family config the lean
            model refuses), both run in transformers, after one log line naming the reason.
        memory_type : "auto", "decoder" or "mlp"
            "auto" picks "mlp" when an mlp_memory_config.json sits beside or above the weights, or the
            weights hold MLP blocks without attention.
        lmbda, knn_temp : float, optional
            Default: the values stored with the memory (memdec_config.json), else 0.55 and 1.0.
        device : default "cuda" when available, else "cpu"
        dtype : float32, float16 or bfloat16; default bfloat16 on CUDA, float32 on the CPU
        tokenizer : default the base's own
        reference : bool, run transformers models and the reference ops (slow; for tests and comparisons)
        base_temp : float, the base's softmax temperature

        Example
        -------
        >>> pair = ModelPair.from_pretrained("gpt2-xl", "path/to/mlp_memory", memory_type="mlp", lmbda=0.3)
        """
        checks.check_memory_type(memory_type)
        device, dtype = _device_dtype(device, dtype)
        lmbda, knn_temp = checkpoint.mixing_defaults(memory, lmbda, knn_temp)
        check_params(1, lmbda=lmbda, knn_temp=knn_temp, base_temp=base_temp)
        for path in (base, memory):  # fail on missing, mismatched or hostile files before any weights load
            checkpoint.check_config_against_weights(path)
        tokenizer = tokenizer or checks.load_tokenizer(base)
        checks.check_tokenizers(tokenizer, memory)
        memory_type = checks.resolve_memory_type(memory, memory_type)
        lean = not reference
        for path in (base,) if memory_type == "mlp" else (base, memory):
            reason = lean_reason(path) if lean else None
            if reason is not None:
                logger.warning("memdec_fast: the pair runs in transformers, not on memdec_fast's lean models: "
                               "%s: %s", os.fspath(path), reason)
                lean = False
        base_runner = load_causal_lm(base, device, dtype, lean=lean)
        mem = _load_memory(memory, memory_type, device, dtype, lean)
        return cls(base_runner, mem, tokenizer, lmbda, knn_temp, base_temp, reference)

    @classmethod
    def share_base(
        cls, base: str | os.PathLike, memories: Mapping[str, str | os.PathLike | Mapping], memory_type: str = "auto",
        lmbda: float | None = None, knn_temp: float | None = None, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, tokenizer=None, base_temp: float = 1.0,
    ) -> dict[str, ModelPair]:
        """Load one base and several memories: {name: ModelPair}, every pair holding the same base runner.

        Everything is checked before any weights load, and each failure is one ValueError line naming the
        memory: the names (unique, URL-safe: :func:`memdec_fast.models.checks.check_memory_names`), each
        memory's files, tokenizer and type; the vocabularies are checked as each pair is built.
        All models run on memdec_fast's lean models (the engine's slot caches).

        Parameters
        ----------
        base : str or PathLike
        memories : {name: path}, or {name: {"path": ..., "memory_type": ..., "lmbda": ..., "knn_temp": ...}}
            A memory's own settings override memory_type, lmbda and knn_temp below.
        memory_type, lmbda, knn_temp, device, dtype, tokenizer, base_temp :
            As in :meth:`from_pretrained`; lmbda and knn_temp default to each memory's stored values.

        Example
        -------
        >>> pairs = ModelPair.share_base("gpt2-xl", {"bio": "path/to/bio", "law": {"path": "path/to/law", "lmbda": 0.3}})
        >>> pairs["bio"].base is pairs["law"].base
        True
        """
        checks.check_memory_names(list(memories))
        device, dtype = _device_dtype(device, dtype)
        checkpoint.check_config_against_weights(base)
        reason = lean_reason(base)
        if reason is not None:
            raise ValueError(f"base {os.fspath(base)}: several memories run on memdec_fast's lean models only: {reason}")
        tokenizer = tokenizer or checks.load_tokenizer(base)
        specs = {name: _memory_spec(name, spec, tokenizer, memory_type, lmbda, knn_temp, base_temp)
                 for name, spec in memories.items()}
        base_runner = load_causal_lm(base, device, dtype, lean=True)
        pairs = {}
        for name, (path, kind, lm, kt) in specs.items():
            mem = _load_memory(path, kind, device, dtype, lean=True)
            try:
                pairs[name] = cls(base_runner, mem, tokenizer, lm, kt, base_temp)
            except ValueError as err:
                raise ValueError(f"memory {name!r}: {err}") from None
        return pairs

    def run_both(self, base_pass: Callable[[], tuple], mem_pass: Callable[[], tuple] | None) -> Logits:
        """Run one pass of each model and cut their logits to the vocabulary: the one place both models run.

        base_pass returns (logits, hidden); an MLP Memory (mem_pass None) reads that hidden state. On
        CUDA a Memory Decoder runs on a side stream, forked from and joined back to the current one by
        events: eagerly the two overlap, and under CUDA-graph capture the graph holds both branches.
        """
        if self.is_mlp:
            base_logits, hidden = base_pass()
            return base_logits[..., : self.vocab], self.memory(hidden)[..., : self.vocab]
        if self._side is None:
            return base_pass()[0][..., : self.vocab], mem_pass()[0][..., : self.vocab]
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)  # fork
        done = torch.cuda.Event()
        try:
            with torch.cuda.stream(self._side):
                mem_logits = mem_pass()[0]
            base_logits = base_pass()[0]
        finally:  # join, even after an error: a capture must not end with the side stream forked
            done.record(self._side)
            main.wait_event(done)
        mem_logits.record_stream(main)
        return base_logits[..., : self.vocab], mem_logits[..., : self.vocab]

    def runners(self) -> list:
        """The models that keep a KV cache: the base, then a Memory Decoder."""
        return [self.base] + ([] if self.is_mlp else [self.memory])

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, last: int | None = None) -> Logits:
        """Both models' logits for full windows, without a cache: input_ids [B, T] -> two [B, T', V] (T' = last,
        default T); possibly strided views (padded vocabulary rows dropped)."""
        mem = None if self.is_mlp else (lambda: self.memory.forward(input_ids, last))
        return self.run_both(lambda: self.base.forward(input_ids, last), mem)

    def new_slot_caches(self, slots: int, length: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per lean runner (:meth:`runners`), zeroed per-block (k, v) [slots, Hkv, length, Dh]."""
        return [r.new_slot_caches(slots, length) for r in self.runners()]

    def slot_forward(self, caches: list, tokens: torch.Tensor, positions: torch.Tensor, rows: slice | torch.Tensor,
                     length: int, slots: torch.Tensor | None = None, last: torch.Tensor | None = None,
                     packing: Packing | None = None) -> Logits:
        """Both lean models over caller-owned slot caches (from :meth:`new_slot_caches`); see
        :meth:`memdec_fast.models.LeanRunner.slot_forward` for the arguments. Returns two [B, V]."""
        def run(i: int) -> Callable[[], tuple]:
            return lambda: self.runners()[i].slot_forward(tokens, positions, caches[i], rows, length, slots, last,
                                                          packing)

        return self.run_both(run(0), None if self.is_mlp else run(1))

    def transformers_passes(self, method: str, *args) -> Logits:
        """Both transformers runners' `method` ("prefill", "decode") with `args`: the fallback path's passes."""
        mem = None if self.is_mlp else (lambda: getattr(self.memory, method)(*args))
        return self.run_both(lambda: getattr(self.base, method)(*args), mem)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Transformers pairs: keep the batch rows `rows` [B'] of both models' own caches (a Memory Decoder's on
        its stream, where its cache lives)."""
        self.base.keep_rows(rows)
        if self.is_mlp:
            return
        if self._side is None:
            self.memory.keep_rows(rows)
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            self.memory.keep_rows(rows)


def _device_dtype(device: torch.device | str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The device (default CUDA when available, else the CPU) and dtype (default bfloat16 on CUDA, float32 on the
    CPU) to load on; ValueError for a dtype other than :data:`DTYPES`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    return device, dtype


def _load_memory(path: str | os.PathLike, memory_type: str, device: torch.device, dtype: torch.dtype, lean: bool):
    """An MLPMemory (memory_type "mlp") or a Memory Decoder's runner."""
    if memory_type == "mlp":
        return MLPMemory.from_pretrained(path, device=device, dtype=dtype)
    return load_causal_lm(path, device, dtype, lean=lean)


MEMORY_SPEC_KEYS = ("path", "memory_type", "lmbda", "knn_temp")


def _memory_spec(name: str, spec, tokenizer, memory_type: str, lmbda: float | None, knn_temp: float | None,
                 base_temp: float) -> tuple[str | os.PathLike, str, float, float]:
    """(path, "decoder" or "mlp", lmbda, knn_temp) of one named memory, checked without loading its weights;
    a failure is a ValueError naming the memory."""
    spec = dict(spec) if isinstance(spec, Mapping) else {"path": spec}
    try:
        unknown = sorted(set(spec) - set(MEMORY_SPEC_KEYS))
        if unknown or "path" not in spec:
            raise ValueError(f"expected a path, or a dict with the keys {MEMORY_SPEC_KEYS} ('path' required), "
                             f"got the keys {sorted(spec)}")
        path = spec["path"]
        lm, kt = checkpoint.mixing_defaults(path, spec.get("lmbda", lmbda), spec.get("knn_temp", knn_temp))
        check_params(1, lmbda=lm, knn_temp=kt, base_temp=base_temp)
        checkpoint.check_config_against_weights(path)
        checks.check_tokenizers(tokenizer, path)
        kind = checks.resolve_memory_type(path, spec.get("memory_type", memory_type))
        reason = lean_reason(path) if kind == "decoder" else None
        if reason is not None:
            raise ValueError(f"several memories run on memdec_fast's lean models only: {reason}")
    except (ValueError, OSError) as err:  # the same type (FileNotFoundError stays one), one line naming the memory
        raise type(err)(f"memory {name!r}: {' '.join(str(err).split())}") from None
    return path, kind, lm, kt
