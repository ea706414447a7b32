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
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]
