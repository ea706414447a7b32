"""Per-row output: tokens, log-probs, text that only ever grows (for streaming), and when a row ends.

The one place where a sampled token is added to a row and the row's end is decided (:meth:`Row.add`),
for the Engine's requests and JointGenerator's prompts alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ending:
    """When a row ends, and whether its text is decoded after every token.

    max_new_tokens: the row ends ("length") at this many tokens; stop_ids: tokens that end it, kept in the
    row ("eos" for eos_id, else "stop"); stop_strings: texts that end it, cut from the text ("stop");
    track_text: decode after every token (streams and stop strings need it), else once at the end.
    """

    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    eos_id: int | None = None
    track_text: bool = False


@dataclass
class Row:
    """What one prompt has generated so far."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "length", "stop" (a stop string or id) or "eos" (the EOS token)

    def update_text(self, tokenizer, stop: tuple[str, ...] | list[str]) -> None:
        """Decode the tokens so far; end the row (and cut the text) at the first stop string."""
        self.text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cuts = [i for i in (self.text.find(s) for s in stop) if i >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"

    def add(self, token: int, logprob: float, ending: Ending, tokenizer) -> None:
        """Append one sampled token, and set finish_reason when it ends the row.

        Checked in this order: a stop string in the text, a stop token id, max_new_tokens.
        """
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        if ending.track_text:
            self.update_text(tokenizer, ending.stop_strings)  # a stop string sets finish_reason "stop"
        if self.finish_reason is None and token in ending.stop_ids:
            self.finish_reason = "eos" if token == ending.eos_id else "stop"
        if self.finish_reason is None and len(self.token_ids) == ending.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and not ending.track_text:
            self.update_text(tokenizer, ())

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
