"""Stop conditions placed on purpose in a greedy completion (shared by the generator, engine and server tests).

- at the last token a request may generate: a stop id, a stop string, or EOS there must still report why the
  request stopped ("stop" / "eos"), not "length";
- across a token boundary: a stop string whose first characters end one token and whose last begins the next,
  so that a stream must hold those first characters back until the next token shows whether the stop completes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AcrossTokens", "AtLastToken", "across_tokens", "at_last_token", "tokenizer_with_eos"]


def texts_so_far(tokenizer, ids: Sequence[int]) -> list[str]:
    """The decoded text after 0, 1, ..., len(ids) tokens, as a row's text grows."""
    return [tokenizer.decode(list(ids[:i]), skip_special_tokens=True) for i in range(len(ids) + 1)]


def grows(before: str, after: str) -> bool:
    """True when `after` extends `before` by characters that later tokens cannot change (no U+FFFD among them:
    the tiny random models emit many lone bytes, which a later byte could complete)."""
    return after.startswith(before) and len(after) > len(before) and "\ufffd" not in after[len(before) :]


@dataclass
class AtLastToken:
    """A prompt whose greedy completion, cut to max_new_tokens = n, can end at token n by each stop condition."""

    prompt: str
    n: int
    stop_id: int  # the n-th token, which occurs nowhere before it
    stop_string: str  # a suffix of the text after n tokens that the text after n - 1 tokens does not hold
    text_before_stop: str  # the completion's text, cut before stop_string


@dataclass
class AcrossTokens:
    """A prompt and a stop string that the greedy completion completes at token `at`, its first characters ending
    token at - 1."""

    prompt: str
    stop: str
    at: int
    text_before_stop: str


def at_last_token(gen, prompts: Sequence[str], longest: int = 12, shortest: int = 3) -> AtLastToken:
    """The first of `prompts` (and the longest n) whose greedy completion allows an :class:`AtLastToken`.

    Fails (AssertionError) when none does: with the tests' fixed random weights that is a change to find out about,
    not a case to skip.
    """
    tok = gen.tokenizer
    for prompt in prompts:
        ids = gen.generate(prompt, max_new_tokens=longest).token_ids[0]
        texts = texts_so_far(tok, ids)
        for n in range(len(ids), shortest - 1, -1):
            t = ids[n - 1]
            if t in ids[: n - 1] or t == tok.eos_token_id or not grows(texts[n - 1], texts[n]):
                continue
            cur = texts[n]
            k = next(k for k in range(1, len(cur) + 1) if cur[-k:] not in texts[n - 1])
            if cur.find(cur[-k:]) == len(cur) - k:  # its first occurrence is the one at the end
                return AtLastToken(prompt, n, t, cur[-k:], cur[:-k])
    raise AssertionError("no prompt's greedy completion can stop at its last token; change the prompts")


def across_tokens(gen, prompts: Sequence[str], width: int = 3, longest: int = 16) -> AcrossTokens:
    """The first prompt, and boundary, that allow an :class:`AcrossTokens` stop string of `width` characters.

    Its first width - 1 characters end a token: the longest proper prefix a stream must hold back.
    """
    tok = gen.tokenizer
    for prompt in prompts:
        ids = gen.generate(prompt, max_new_tokens=longest).token_ids[0]
        texts = texts_so_far(tok, ids)
        for i in range(1, len(ids)):
            before, after = texts[i], texts[i + 1]
            if len(before) < width - 1 or not grows(before, after) or not grows(texts[i - 1], before):
                continue
            stop = before[len(before) - width + 1 :] + after[len(before)]
            at = after.find(stop)
            if at == len(before) - width + 1 and "\ufffd" not in stop and not stop.isspace():
                return AcrossTokens(prompt, stop, i + 1, after[:at])
    raise AssertionError("no prompt's greedy completion has a stop string across two tokens; change the prompts")


def tokenizer_with_eos(tokenizer, token_id: int):
    """A copy of `tokenizer` whose EOS is `token_id` (a token the models actually emit)."""
    out = copy.deepcopy(tokenizer)
    out.eos_token = tokenizer.convert_ids_to_tokens(token_id)
    return out
