"""Per-row output: tokens, log-probs, and text that only ever grows (for streaming)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    """What one prompt has generated so far."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "length", "stop" (a stop string or id) or "eos" (the EOS token)

    def update_text(self, tokenizer, stop: list[str]) -> None:
        """Decode the tokens so far; end the row (and cut the text) at the first stop string."""
        self.text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cuts = [i for i in (self.text.find(s) for s in stop) if i >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"

    def stable_text(self, stop: list[str]) -> str:
        """The part of the text that later tokens cannot change.

        Held back: trailing U+FFFD (a UTF-8 character split across tokens), and
        any tail that could be the start of a stop string.
        """
        if self.finish_reason is not None:
            return self.text
        text = self.text.rstrip("\ufffd")
        hold = max((held_back(text, s) for s in stop), default=0)
        return text[: len(text) - hold]


def held_back(text: str, stop: str) -> int:
    """The length of the longest proper prefix of `stop` that `text` ends with.

    Only the last len(stop) - 1 characters can hold one, and a candidate starts where `stop`'s first
    character occurs there: the work per call is about len(stop) character comparisons (at worst
    len(stop)**2, done by str.startswith), whatever the length of the text.
    """
    tail = text[max(0, len(text) - len(stop) + 1) :]
    i = tail.find(stop[0]) if stop else -1
    while i != -1:
        if stop.startswith(tail[i:]):
            return len(tail) - i
        i = tail.find(stop[0], i + 1)
    return 0
