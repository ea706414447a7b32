"""Hugging Face ``generate`` arguments: the common ones with HF's meaning, the rest refused with a pointer.

People arrive with ``model.generate(..., do_sample=True, max_length=50)`` in their
fingers. ``do_sample``, ``max_length``, ``repetition_penalty`` and
``num_return_sequences`` mean what they mean in transformers; any other HF
argument raises a TypeError that says what to use instead.
"""

from __future__ import annotations

from memdec_fast import ranges

DEFAULT_MAX_NEW_TOKENS = 32

_INSTEAD = {
    "num_beams": "beam search is not supported; use temperature=0 (greedy) or sampling",
    "num_beam_groups": "beam search is not supported",
    "diversity_penalty": "beam search is not supported",
    "length_penalty": "beam search is not supported",
    "early_stopping": "beam search is not supported",
    "penalty_alpha": "contrastive search is not supported",
    "eos_token_id": "pass stop=[token_id]; the tokenizer's EOS always ends a row",
    "stop_strings": "pass stop=['...']",
    "stopping_criteria": "pass stop=[...] with token ids or strings",
    "pad_token_id": "padding is internal; nothing to set",
    "attention_mask": "pass unpadded prompts; padding is internal",
    "input_ids": "pass the prompts as the first argument",
    "min_new_tokens": "not supported; filter the result or raise max_new_tokens",
    "min_length": "not supported; filter the result or raise max_new_tokens",
    "no_repeat_ngram_size": "not supported; repetition_penalty is",
    "typical_p": "use top_p, top_k or min_p",
    "epsilon_cutoff": "use min_p",
    "eta_cutoff": "use min_p",
    "bad_words_ids": "not supported",
    "logits_processor": "not supported; the mixture is sampled in one fused kernel",
    "output_scores": "GenerationResult.logprobs holds each token's log p",
    "output_logits": "use JointGenerator.score_logits",
    "return_dict_in_generate": "generate always returns a GenerationResult",
    "generation_config": "pass the sampling arguments directly",
    "streamer": "use JointGenerator.stream",
    "use_cache": "the cache is always used",
}


def refuse_unknown(where: str, kwargs: dict) -> None:
    """TypeError for arguments generate() does not take, saying what to use instead where we know."""
    if not kwargs:
        return
    hints = [f"{k} ({_INSTEAD[k]})" if k in _INSTEAD else k for k in sorted(kwargs)]
    raise TypeError(f"{where}: unsupported argument(s): {'; '.join(hints)}")


def resolve_length(max_new_tokens: int | None, max_length: int | None, longest_prompt: int) -> int:
    """max_new_tokens from either form; HF's max_length counts the (longest) prompt too."""
    if max_length is None:
        return DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if max_new_tokens is not None:
        raise ValueError("max_length: give max_new_tokens or max_length, not both")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= longest_prompt:
        raise ValueError(f"max_length: {max_length!r} leaves no room for new tokens after a prompt of "
                         f"{longest_prompt} tokens (max_length counts the prompt; or use max_new_tokens)")
    return max_length - longest_prompt


def resolve_temperature(temperature, do_sample: bool | None):
    """HF: do_sample=False is greedy whatever the temperature; do_sample=True samples at temperature 1 by default."""
    if do_sample is None:
        return 0.0 if temperature is None else temperature
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample: expected True or False, got {do_sample!r}")  # noqa: TRY004
    if not do_sample:
        return 0.0
    if temperature is None:
        return 1.0
    if isinstance(temperature, (int, float)) and temperature == 0:
        raise ValueError("temperature: 0 means greedy, which contradicts do_sample=True")
    return temperature


def check_repetition_penalty(penalty: float) -> float:
    ranges.check("generate.repetition_penalty", penalty)
    return float(penalty)


def check_num_return_sequences(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_return_sequences: expected an int >= 1, got {n!r}")
    return n
