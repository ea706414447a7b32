"""The two ways one generate() call decodes a batch of prompts, behind one interface.

- :class:`SlotSession`: a lean pair (memdec_fast's GPT-2 / Llama family) on the engine's decode step
  (:class:`memdec_fast.engine.step.ModelStep`): prompt i in cache slot i, the same caches, graphs and
  sampler call as the Engine.
- :class:`TransformersSession`: the fallback for pairs running in transformers, a left-padded batch in
  the models' own dynamic caches.

Both give the first token of every prompt (``start``), then one token per computed row per ``step``.
Finished rows stay computed until half or fewer of the rows are live; then ``keep_rows`` drops them, so
that a row's sampled numbers depend on the same rows as they always have (one Philox draw per computed
row and call).
"""

from __future__ import annotations

import torch

from memdec_fast import ops
from memdec_fast.engine.step import ModelStep
from memdec_fast.generation.penalty import RepetitionPenalty
from memdec_fast.generation.requests import left_pad, select_rows
from memdec_fast.models.pair import Logits, ModelPair
from memdec_fast.ops import reference
from memdec_fast.ops.params import Param

Samples = tuple[list[int], list[float]]
"""Each computed row's token (-1 for NaN or infinite logits) and its log p under the mixture."""


class EagerSampler:
    """One sampler call over the computed rows, from the step's logits: a seeded call's one generator, or
    the repetition penalty (which reads each row's history)."""

    def __init__(self, pair: ModelPair, rows: list[list[int]], params: dict[str, Param], rng: torch.Generator | None,
                 penalty: float):
        module = reference if pair.reference else ops
        self.params, self.rng = params, rng
        self.penalty = None if penalty == 1.0 else RepetitionPenalty(rows, pair.vocab, penalty, pair.device, module)
        self.fn = self.penalty or module.sample

    def __call__(self, logits: Logits) -> Samples:
        tokens, logprobs = self.fn(*logits, **self.params, generator=self.rng)
        return tokens.tolist(), logprobs.tolist()

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.params = select_rows(self.params, rows)
        if self.penalty is not None:
            self.penalty.keep_rows(rows)


class SlotSession:
    """One call's prompts in slots [0, B) of a :class:`ModelStep`; the positions it wrote are zeroed at close()
    (the scratch slot, which attention never reads, aside).

    Parameters
    ----------
    step : ModelStep with at least B slots of `length` positions
    rows : the prompts' token ids
    length : positions the call uses (longest prompt + max_new_tokens - 1)
    params : sampling parameters, scalars or tensors [B]
    sampler : EagerSampler for every sample (seeded or penalised calls), or None: the step's own
        batched sampler (its parameter table and generator) after the first token
    """

    def __init__(self, step: ModelStep, rows: list[list[int]], length: int, params: dict[str, Param],
                 sampler: EagerSampler | None):
        self.step, self.rows, self.length, self.sampler = step, rows, length, sampler
        self.live = list(range(len(rows)))  # slot of each computed row
        self.positions = [len(r) - 1 for r in rows]  # per slot: the position of the last token fed
        step.set_params(0, params, len(rows))
        self.first = sampler or EagerSampler(step.pair, rows, params, step.rng, 1.0)

    def start(self) -> Samples:
        return self.first(self.step.prefill([(i, r, 0) for i, r in enumerate(self.rows)]))

    def step_rows(self, tokens: list[int]) -> Samples:
        """Feed each computed row its last token; a finished row's -1 (NaN logits) feeds 0 (nobody reads it)."""
        n = self.step.bucket(max(self.live) + 1)
        fed, positions = [0] * n, [min(p, self.length - 1) for p in self.positions[:n]] + [0] * (n - len(self.rows))
        for slot, t in zip(self.live, tokens):
            self.positions[slot] += 1
            fed[slot], positions[slot] = max(t, 0), self.positions[slot]
        logits, out_tokens, out_logprobs = self.step.decode(fed, positions)
        if self.sampler is None:
            return [out_tokens[s] for s in self.live], [out_logprobs[s] for s in self.live]
        idx = torch.tensor(self.live, device=self.step.device)
        return self.sampler((logits[0].index_select(0, idx), logits[1].index_select(0, idx)))

    def keep_rows(self, keep: list[int]) -> None:
        if self.sampler is not None:
            self.sampler.keep_rows(torch.tensor(keep, device=self.step.device))
        self.live = [self.live[i] for i in keep]

    def close(self) -> None:
        for slot in range(self.step.bucket(len(self.rows))):  # the bucket's padding rows wrote dummies at position 0
            self.step.clear_slot(slot, self.length)


class TransformersSession:
    """One call's prompts as a left-padded batch in the transformers models' own caches (the fallback path)."""

    def __init__(self, pair: ModelPair, rows: list[list[int]], length: int, pad_id: int, sampler: EagerSampler):
        self.pair, self.rows, self.length, self.pad_id, self.sampler = pair, rows, length, pad_id, sampler

    def start(self) -> Samples:
        ids, mask = left_pad(self.rows, self.pad_id, self.pair.device)
        return self.sampler(self.pair.transformers_passes("prefill", ids, mask, self.length))

    def step_rows(self, tokens: list[int]) -> Samples:
        fed = torch.tensor(tokens, device=self.pair.device).clamp_min(0)  # a finished row's -1 must still embed
        return self.sampler(self.pair.transformers_passes("decode", fed))

    def keep_rows(self, keep: list[int]) -> None:
        rows = torch.tensor(keep, device=self.pair.device)
        self.pair.keep_rows(rows)
        self.sampler.keep_rows(rows)

    def close(self) -> None:
        pass
