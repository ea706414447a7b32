"""The engine's prefill budget (memdec_fast/engine/scheduler.py): prompt tokens per step from measured costs."""

from __future__ import annotations

import pytest

from memdec_fast.engine.scheduler import MAX_PREFILL_STEPS, MIN_PREFILL, PrefillBudget, Request, Scheduler
from memdec_fast.generation.outputs import Ending


def request(rid: str, prompt_len: int) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), {}, None, Ending(8, frozenset(), (), 0, False), False,
                   sink=None)


def measured(cap: int, token_seconds: float, step_seconds: float) -> PrefillBudget:
    budget = PrefillBudget(cap, steps=1.0)
    budget.prefilled(tokens=10, seconds=10 * token_seconds)
    budget.decoded(seconds=step_seconds)
    return budget


def test_budget_is_the_cap_without_steps():
    assert measured(512, 0.01, 0.1).tokens(decoding=True) == 16
    budget = PrefillBudget(cap=512)  # no steps: up to the cap, always
    budget.prefilled(tokens=10, seconds=0.1)
    budget.decoded(seconds=0.1)
    assert budget.tokens(decoding=True) == 512


def test_budget_is_the_cap_until_both_costs_are_measured_or_when_nothing_decodes():
    budget = PrefillBudget(cap=512, steps=1.0)
    assert budget.tokens(decoding=True) == 512
    budget.decoded(seconds=0.1)
    assert budget.tokens(decoding=True) == 512  # the prompt token's cost is still unknown
    budget.prefilled(tokens=7, seconds=0.07)
    assert budget.tokens(decoding=True) == MIN_PREFILL  # 10 fit one step: clamped up
    assert budget.tokens(decoding=False) == 512


@pytest.mark.parametrize(("token_ms", "step_ms", "cap", "want"), [
    (3.1, 130.0, 512, 42),  # a CPU: a prompt token costs about a decode row; the chunk costs one decode step
    (0.02, 9.0, 512, 450),  # a GPU: prompt tokens are cheap beside a bandwidth-bound step
    (0.01, 9.0, 300, 300),  # ... capped by prefill_chunk
    (50.0, 60.0, 512, MIN_PREFILL),  # at least MIN_PREFILL, however slow
    (50.0, 60.0, 4, 4),  # ... unless prefill_chunk is smaller
])
def test_budget_fits_one_decode_step_within_min_and_cap(token_ms, step_ms, cap, want):
    assert measured(cap, token_ms / 1e3, step_ms / 1e3).tokens(decoding=True) == want


def test_costs_are_moving_averages_that_follow_a_slower_host():
    budget = measured(512, 0.004, 0.2)  # 50 tokens
    for _ in range(20):  # the host gets busy: prompt tokens cost twice as much, decode steps too
        budget.prefilled(tokens=25, seconds=0.2)
        budget.decoded(seconds=0.4)
    assert budget.token_seconds == pytest.approx(0.008, rel=0.01)
    assert budget.step_seconds == pytest.approx(0.4, rel=0.01)
    budget.prefilled(tokens=0, seconds=0.0)  # a step without prefill measures nothing
    assert budget.token_seconds == pytest.approx(0.008, rel=0.01)


def test_a_step_of_prefill_and_decode_together_charges_the_prompt_tokens_what_it_took_beyond_a_decode_step():
    budget = PrefillBudget(cap=512, steps=1.0)
    budget.mixed(tokens=10, seconds=0.3)  # no decode step measured yet: nothing to subtract, nothing learnt
    assert budget.token_seconds is None
    budget.decoded(seconds=0.1)
    budget.mixed(tokens=10, seconds=0.3)
    assert budget.token_seconds == pytest.approx(0.02)  # (0.3 - 0.1) / 10
    assert budget.tokens(decoding=True) == MIN_PREFILL  # 5 fit one step: clamped up
    budget.mixed(tokens=10, seconds=0.05)  # faster than a decode step alone (noise): a cost of 0, never negative
    assert budget.token_seconds == pytest.approx(0.015)
    assert budget.step_seconds == pytest.approx(0.1)  # only decode steps alone measure a decode step


def admitted(sched: Scheduler, *reqs: Request) -> None:
    for r in reqs:
        sched.add(r)
    sched.admit()


def test_plan_prefills_oldest_first_within_the_budget_while_a_row_decodes():
    sched = Scheduler(max_batch=4, max_queue=8, prefill_chunk=512)
    sched.budget = measured(512, 0.005, 0.1)  # 20 tokens
    decoding, a, b = request("d", 3), request("a", 15), request("b", 40)
    admitted(sched, decoding, a, b)
    decoding.computed = 3
    decoding.row.token_ids.append(5)
    plan = sched.prefill_plan()
    assert [(r.request_id, s, e) for r, s, e in plan] == [("a", 0, 15), ("b", 0, 5)]
    a.computed, b.computed = 15, 5
    decoding.row.token_ids.clear()  # nothing decodes: the whole cap
    assert [(r.request_id, s, e) for r, s, e in sched.prefill_plan()] == [("b", 5, 40)]


def test_a_request_prefilling_for_max_prefill_steps_gets_the_cap():
    sched = Scheduler(max_batch=2, max_queue=8, prefill_chunk=512)
    sched.budget = measured(512, 0.01, 0.16)  # 16 tokens
    decoding, long = request("d", 2), request("long", 1000)
    admitted(sched, decoding, long)
    decoding.computed = 2
    decoding.row.token_ids.append(5)
    sizes = []
    for _ in range(MAX_PREFILL_STEPS + 2):
        (req, start, end), = sched.prefill_plan()
        req.computed = end
        sizes.append(end - start)
    assert sizes == [16] * MAX_PREFILL_STEPS + [512, 1000 - 16 * MAX_PREFILL_STEPS - 512]
