"""The output types of every front: a row in progress, the finished outputs, and the deltas of a stream.

- :class:`Row`: what one prompt or request has generated so far; :meth:`Row.add` is the one place where a
  sampled token is added and the row's end decided (:class:`Ending`), for the Engine and JointGenerator alike.
- :class:`RequestOutput`: one finished Engine request (:meth:`Row.output`).
- :class:`StreamDelta`: what a streamed request produced since its previous delta.
- :class:`GenerationResult`: a JointGenerator.generate call, one entry per prompt (:meth:`GenerationResult.of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Ending", "GenerationResult", "RequestOutput", "Row", "StreamDelta", "held_back"]


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

    def output(self, request_id: str, prompt_tokens: int) -> RequestOutput:
        """This finished row as one request's output."""
        return RequestOutput(request_id, self.text, list(self.token_ids), list(self.logprobs), self.finish_reason,
                             prompt_tokens)

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


@dataclass
class RequestOutput:
    """One finished request.

    text: the completion, without special tokens, cut before a stop string.
    token_ids: every generated token, including the EOS or stop token that ended it.
    logprobs: log p of each token under the unfiltered mixture.
    finish_reason: "length", "stop" (a stop string or stop token id) or "eos" (the tokenizer's EOS).
    prompt_tokens: how many tokens the prompt encoded to.
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int


@dataclass
class StreamDelta:
    """What one request produced since its previous delta.

    text: new stable text (may be empty while a UTF-8 character or a stop string is pending).
    token_ids, logprobs: the new tokens and their log p.
    finish_reason: None until the last delta of the request.
    """

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0


@dataclass
class GenerationResult:
    """Output of :meth:`JointGenerator.generate`, one entry per prompt.

    token_ids holds every generated token, including the EOS or stop token that
    ended a row; logprobs holds log p of each under the (unfiltered) mixture;
    texts is their decoding without special tokens, cut before a stop string.
    finish_reasons: "length", "stop" (a stop string or a stop token id) or "eos" (the
    tokenizer's EOS token). With num_return_sequences=n, each prompt's n results are
    consecutive.
    """

    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]

    @classmethod
    def of(cls, rows: list[Row]) -> GenerationResult:
        """The finished rows of one call, in order."""
        return cls([r.text for r in rows], [r.token_ids for r in rows], [r.logprobs for r in rows],
                   [r.finish_reason for r in rows])


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
