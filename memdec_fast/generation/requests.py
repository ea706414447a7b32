"""Turning a generate() call into tensors: prompts, sampling parameters, stop conditions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memdec_fast.ops.params import Param, check_params

Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
"""One prompt or a batch: text, token ids, or an unpadded LongTensor [B, T]."""


def encode_prompts(prompts: Prompts, tokenizer, vocab: int) -> list[list[int]]:
    """Token ids of each prompt; raises ValueError for bytes, empty prompts or ids outside [0, vocab)."""
    refuse_bytes("prompts", prompts)
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2) or prompts.is_floating_point():
            raise ValueError(f"input_ids: expected an integer tensor [B, T], got {prompts.dtype} {list(prompts.shape)}")
        prompts = prompts.reshape(-1, prompts.shape[-1]).tolist()
    elif isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        prompts = [list(prompts)]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: expected a string, a list of strings or token ids; got an empty batch")
    rows = []
    for i, p in enumerate(prompts):
        refuse_bytes(f"prompts[{i}]", p)
        if isinstance(p, str):
            check_text(f"prompts[{i}]", p)
        # verbose=False: a prompt past the model's context gets our own "prompt too long" error, not a tokenizer warning
        ids = tokenizer.encode(p, add_special_tokens=False, verbose=False) if isinstance(p, str) else list(p)
        if not ids:
            raise ValueError(f"prompts[{i}]: empty prompt (it encodes to no tokens)")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompts[{i}]: token ids must be ints in [0, {vocab})")
        rows.append(ids)
    return rows


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T] int64, attention_mask [B, T] bool), padded on the left."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.int64)
    mask = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows])
    return ids.to(device), mask.to(device)


def sampling_params(rows: int, device: torch.device, **values) -> dict[str, Param]:
    """Scalars stay Python numbers; per-row lists or tensors become tensors [rows] on `device`; all checked."""
    out: dict[str, Param] = {}
    for name, v in values.items():
        if isinstance(v, (list, tuple)):
            v = torch.tensor(v)
        if isinstance(v, torch.Tensor):
            v = v.to(device)
        out[name] = v
    check_params(rows, **out)
    return out


def select_rows(params: dict[str, Param], rows: torch.Tensor) -> dict[str, Param]:
    """Per-row parameters restricted to the batch rows `rows` [B']."""
    return {k: v.index_select(0, rows) if isinstance(v, torch.Tensor) else v for k, v in params.items()}


MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024
MAX_STOP_IDS = 1024
"""Limits on a request's stop conditions: the work per generated token grows with them."""


def parse_stop(stop: int | str | Sequence[int | str] | None, tokenizer, vocab: int) -> tuple[set[int], list[str]]:
    """(stop token ids, stop strings), EOS included in the ids; at most MAX_STOP_STRINGS strings of at most
    MAX_STOP_LENGTH characters, and MAX_STOP_IDS ids."""
    ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    if stop is None:
        return ids, []
    refuse_bytes("stop", stop)
    items = [stop] if isinstance(stop, (int, str)) else list(stop)
    strings = []
    for s in items:
        refuse_bytes("stop", s)
        if isinstance(s, str) and s:
            check_text("stop", s)
            strings.append(s)
        elif isinstance(s, int) and not isinstance(s, bool) and 0 <= s < vocab:
            ids.add(s)
        else:
            raise ValueError(f"stop: expected token ids in [0, {vocab}) or non-empty strings, got {s!r:.80}")
    longest = max(strings, key=len, default="")
    if len(strings) > MAX_STOP_STRINGS or len(longest) > MAX_STOP_LENGTH or len(items) - len(strings) > MAX_STOP_IDS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters and "
                         f"{MAX_STOP_IDS} token ids, got {len(strings)} strings (the longest {len(longest)} "
                         f"characters) and {len(items) - len(strings)} ids")
    return ids, strings


def refuse_bytes(name: str, value) -> None:
    """ValueError for bytes, which are a sequence of ints and would otherwise pass as token ids."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(  # noqa: TRY004 - a bad argument value, reported like every other
            f"{name}: got bytes; pass text as str (e.g. value.decode('utf-8')) or token ids as a list of ints")


def check_text(name: str, text: str) -> None:
    """ValueError for text that is not valid Unicode (a lone surrogate such as "\\ud800", which JSON can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name}: not valid Unicode: a lone surrogate at character {err.start}") from None


def check_one_prompt(prompt, name: str = "prompt") -> None:
    """ValueError unless `prompt` is one prompt: a string or a sequence of token ids (bytes are refused by name)."""
    refuse_bytes(name, prompt)
    if not isinstance(prompt, str) and not (isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt)):
        raise ValueError(f"{name}: expected one prompt (a string or a list of token ids)")


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """ValueError when a prompt and its new tokens need more positions than the context holds (the last token needs
    no forward)."""
    if prompt_tokens + max_new_tokens - 1 > context:
        raise ValueError(
            f"prompt too long: {prompt_tokens} prompt tokens + max_new_tokens={max_new_tokens} need "
            f"{prompt_tokens + max_new_tokens - 1} positions, but the context window is {context}"
        )


MAX_SEED = 2**64 - 1
"""The largest seed: torch.Generator takes 64-bit seeds."""


def check_request(max_new_tokens: int, seed: int | None) -> None:
    """ValueError for a max_new_tokens below 1 or a seed outside [0, MAX_SEED]."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed: expected an int in [0, 2**64 - 1] or None, got {seed!r}")
