"""Stop strings: the streamed hold-back equals its definition, costs little per token, and is bounded per request."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memdec_fast.generation.outputs import Row, held_back
from memdec_fast.generation.requests import MAX_STOP_LENGTH, MAX_STOP_STRINGS, parse_stop


def held_back_by_definition(text: str, stop: str) -> int:
    return max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="abQ\ufffd", max_size=30), st.text(alphabet="abQ", min_size=1, max_size=12))
def test_held_back_equals_its_definition(text, stop):
    assert held_back(text, stop) == held_back_by_definition(text, stop)


def test_a_long_stop_string_costs_little_per_token():
    """A stop string of the longest length allowed, against a long text that ends with many candidate starts."""
    stop = "Q" * (MAX_STOP_LENGTH - 1) + "X"
    row = Row(text="word " * 20_000 + "Q" * 5000)
    start = time.perf_counter()
    for _ in range(100):
        held = len(row.text) - len(row.stable_text([stop] * MAX_STOP_STRINGS))
    per_token = (time.perf_counter() - start) / 100
    assert held == MAX_STOP_LENGTH - 1
    assert per_token < 0.001, f"{per_token * 1e3:.2f} ms per token"  # the old loop took 6 ms here


@pytest.mark.parametrize("stop", [
    ["Q" * (MAX_STOP_LENGTH + 1)],
    [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)],
    ["Q" * 400_000],
])
def test_stop_strings_beyond_the_limits_are_refused(tokenizer, stop):
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRINGS} strings"):
        parse_stop(stop, tokenizer, len(tokenizer))


def test_stop_strings_at_the_limits_are_taken(tokenizer):
    stop = ["Q" * MAX_STOP_LENGTH] + [f"s{i}" for i in range(MAX_STOP_STRINGS - 1)]
    assert parse_stop(stop, tokenizer, len(tokenizer))[1] == stop
