"""The valid range of every number a user can give: one table for the ops' checks and the command line's parsers.

``RANGES`` maps ``"<op>.<parameter>"`` to a :class:`Range`; the functions that
take those numbers check them with :func:`check`, and ``FLAGS`` ties each
numeric flag of each ``memdec-fast`` subcommand to its entry, from which the
parser takes its type (see ``memdec_fast.cli.args.apply_ranges``). So a value the
parser lets through is one the op takes, and a bad one stops before any model
loads. This module imports neither torch nor anything heavy: ``--help`` reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FLAGS", "FLOAT32_MAX", "RANGES", "Range", "check"]

FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32 (torch.finfo(torch.float32).max): the kernels apply temperatures in float32."""


@dataclass(frozen=True)
class Range:
    """Numbers of one kind (int or float) between `low` and `high`; each end included unless marked open.

    NaN is never in a range; an infinite end is always open.
    """

    kind: type
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and (self.kind is int or math.isnan(value)):
            return False
        above = value > self.low if self.low_open or math.isinf(self.low) else value >= self.low
        below = value < self.high if self.high_open or math.isinf(self.high) else value <= self.high
        return above and below

    def describe(self) -> str:
        """E.g. ``(0.0, 1.0]`` or ``[1, inf)``."""
        left = "(" if self.low_open or math.isinf(self.low) else "["
        right = ")" if self.high_open or math.isinf(self.high) else "]"
        return f"{left}{self.low}, {self.high}{right}"

    def parse(self, text: str) -> int | float:
        """The number `text` spells, or ValueError naming the range (argparse shows it as the flag's error)."""
        try:
            value = self.kind(text)
        except ValueError:
            kind = "an int" if self.kind is int else "a number"
            raise ValueError(f"{text!r} is not {kind}") from None
        if value not in self:
            raise ValueError(f"{text} is outside {self.describe()}")
        return value


def check(key: str, value: object, name: str | None = None) -> None:
    """ValueError ``"<name>: <value> is outside <range>"`` unless `value` lies in ``RANGES[key]``.

    `name` defaults to the parameter part of `key`.

    Example
    -------
    >>> check("generate.top_p", 0.0)
    Traceback (most recent call last):
    ValueError: top_p: 0.0 is outside (0.0, 1.0]
    """
    r = RANGES[key]
    if value not in r:
        raise ValueError(f"{name or key.rsplit('.', 1)[1]}: {value!r} is outside {r.describe()}")


_INT_1 = Range(int, 1)  # counts: tokens, steps, rows
_UNIT = Range(float, 0.0, 1.0)
_TEMP = Range(float, 0.0, FLOAT32_MAX, low_open=True)  # a softmax temperature the kernels take
_POSITIVE = Range(float, 0.0, math.inf, low_open=True, high_open=True)
_SEED = Range(int, 0, 2**64 - 1)  # torch.Generator.manual_seed's range

SAMPLING = {
    "lmbda": _UNIT,
    "knn_temp": _TEMP,
    "base_temp": _TEMP,
    "temperature": Range(float, 0.0, FLOAT32_MAX),
    "top_k": Range(int, 0),
    "top_p": Range(float, 0.0, 1.0, low_open=True),
    "min_p": _UNIT,
}
"""The ops' sampling parameters (memdec_fast.ops.params.check_params)."""

RANGES: dict[str, Range] = {
    **{f"generate.{k}": v for k, v in SAMPLING.items()},
    "generate.max_new_tokens": _INT_1,
    "generate.seed": _SEED,
    "generate.repetition_penalty": _POSITIVE,
    "ppl.lmbda": _UNIT,
    "ppl.knn_temp": _TEMP,
    "ppl.block_size": Range(int, 2),  # the stride must lie in [1, block_size)
    "ppl.stride": _INT_1,
    "ppl.batch_size": _INT_1,
    "bench.prompt_tokens": _INT_1,
    "bench.new_tokens": _INT_1,
    "bench.batch_size": _INT_1,
    "bench.repeats": _INT_1,
    "datastore.block_size": Range(int, 2),  # a block scores block_size - 1 next tokens
    "datastore.batch_size": _INT_1,
    "targets.k": _INT_1,
    "targets.temperature": _POSITIVE,
    "targets.width": _INT_1,
    "targets.exact_max": Range(int, 0),
    "train.epochs": _INT_1,
    "train.batch_size": _INT_1,
    "train.lr": _POSITIVE,
    "train.warmup_steps": Range(int, 0),
    "train.grad_clip": _POSITIVE,
    "train.alpha": _UNIT,
    "train.save_every": _INT_1,
    "train.seed": _SEED,
    "train.knn_temp": _TEMP,
    "mlp.n_layer": _INT_1,
    "mlp.n_embd": _INT_1,
    "compare.k": _INT_1,
    "compare.temperature": _POSITIVE,
    "compare.knn_lmbda": _UNIT,
    "compare.new_tokens": _INT_1,
    "engine.max_batch": _INT_1,
    "engine.max_queue": Range(int, 0),
    "engine.prefill_chunk": _INT_1,
    "engine.prefill_steps": _POSITIVE,
    "engine.max_context": Range(int, 2),
    "serve.port": Range(int, 0, 65535),
    "serve.drain_timeout": Range(float, 0.0, 86400.0),
    "serve.max_body_bytes": _INT_1,
}
"""``"<op>.<parameter>"`` -> its range; the ops check their arguments against these entries."""

_TRAINING = {"--knn-temp": "train.knn_temp", "--epochs": "train.epochs", "--batch-size": "train.batch_size",
             "--lr": "train.lr", "--warmup-steps": "train.warmup_steps", "--grad-clip": "train.grad_clip",
             "--alpha": "train.alpha", "--save-every": "train.save_every", "--seed": "train.seed"}

FLAGS: dict[str, dict[str, str]] = {
    "generate": {"--max-new-tokens": "generate.max_new_tokens", "--temperature": "generate.temperature",
                 "--top-k": "generate.top_k", "--top-p": "generate.top_p", "--min-p": "generate.min_p",
                 "--repetition-penalty": "generate.repetition_penalty", "--seed": "generate.seed",
                 "--lmbda": "generate.lmbda", "--knn-temp": "generate.knn_temp"},
    "ppl": {"--lmbda": "ppl.lmbda", "--knn-temp": "ppl.knn_temp", "--block-size": "ppl.block_size",
            "--stride": "ppl.stride", "--batch-size": "ppl.batch_size"},
    "bench": {"--prompt-tokens": "bench.prompt_tokens", "--new-tokens": "bench.new_tokens",
              "--batch-sizes": "bench.batch_size", "--lmbda": "generate.lmbda", "--repeats": "bench.repeats"},
    "demo": {"--max-new-tokens": "generate.max_new_tokens"},
    "serve": {"--port": "serve.port", "--lmbda": "generate.lmbda", "--knn-temp": "generate.knn_temp",
              "--max-batch": "engine.max_batch", "--max-queue": "engine.max_queue",
              "--prefill-chunk": "engine.prefill_chunk", "--prefill-steps": "engine.prefill_steps",
              "--max-context": "engine.max_context",
              "--max-body-bytes": "serve.max_body_bytes", "--drain-timeout": "serve.drain_timeout"},
    "train datastore": {"--block-size": "datastore.block_size", "--batch-size": "datastore.batch_size"},
    "train targets": {"--k": "targets.k", "--temperature": "targets.temperature", "--width": "targets.width",
                      "--exact-max": "targets.exact_max"},
    "train decoder": _TRAINING,
    "train mlp": {**_TRAINING, "--n-layer": "mlp.n_layer", "--n-embd": "mlp.n_embd"},
    "train compare": {"--k": "compare.k", "--temperature": "compare.temperature", "--knn-lmbda": "compare.knn_lmbda",
                      "--new-tokens": "compare.new_tokens"},
}
"""``memdec-fast`` subcommand (``"train mlp"`` for a step) -> numeric flag -> its entry in RANGES."""
