"""One request's output text: incremental detokenizing, stop-string hold-back and trimming.

Workers stop on stop strings themselves; when they do, the text ends with (or just past)
the matched string and the router cuts it off. While streaming, the last
`longest_stop - 1` characters are held back, so a stop string that arrives over several
tokens is never half-sent: the client sees exactly the trimmed text, chunk by chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: Optional[list[float]]
    finish_reason: Optional[str] = None
    top_logprobs: Optional[list] = None        # per token: [[token_id, logprob], ...]
    prompt_logprobs: Optional[list] = None     # echo with logprobs: prompt tokens 1..


@dataclass(slots=True)
class CompletionText:
    detokenizer: object                        # IncrementalDetokenizer
    stop: list[str]
    unsent: str = ""                           # decoded, not handed to the client yet
    hold_back: int = field(init=False)         # characters that could start a stop string

    def __post_init__(self) -> None:
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.detokenizer.ids)      # NOTE: the ids are the detokenizer's, kept once

    def add(self, token_ids: list[int], logprobs: Optional[list[float]],
            finish_reason: Optional[str]) -> TextDelta:
        """New tokens in; the text that may be sent now out (all of it once finished)."""
        if token_ids:
            self.unsent += self.detokenizer.add(token_ids)
        if finish_reason is None:
            return TextDelta(self._release(), token_ids, logprobs, None)
        delta, self.unsent = self.unsent + self.detokenizer.finish(), ""
        if finish_reason == "stop" and self.stop:
            delta = delta[:self._stop_position(delta)]
        return TextDelta(delta, token_ids, logprobs, finish_reason)

    def add_token(self, token_id: int) -> str:
        """`add` of one token that does not finish: the text that may be sent now."""
        if not self.hold_back and not self.unsent:    # no stop string to watch for
            return self.detokenizer.add_one(token_id)
        self.unsent += self.detokenizer.add_one(token_id)
        return self._release()

    def _release(self) -> str:
        """The text not sent yet, but for the last `hold_back` characters."""
        cut = len(self.unsent) - self.hold_back
        if cut <= 0:
            return ""
        delta, self.unsent = self.unsent[:cut], self.unsent[cut:]
        return delta

    def _stop_position(self, text: str) -> int:
        """Start of the earliest stop string in `text` (not sent yet), or its end if none."""
        hits = [i for s in self.stop if (i := text.find(s)) >= 0]
        return min(hits) if hits else len(text)
