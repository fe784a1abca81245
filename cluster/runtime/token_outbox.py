"""TokenOutbox: a worker's new tokens on their way to the router, one `tokens` message per
processed batch. Items with a finish, an error or logprobs go as `TokensItem`s; a decode
step's bare tokens (one each, nothing else) go after them as one `PlainTokens`."""
from __future__ import annotations

from typing import Optional

from cluster.runtime.request_marks import MarkBook
from cluster.runtime.schedule_batch import Req
from cluster.wire import protocol as P


class TokenOutbox:
    def __init__(self, worker_id: str, control, marks: MarkBook):
        self.worker_id = worker_id
        self.control = control
        self.marks = marks
        self.items: list[P.TokensItem] = []
        self.plain_rids: list[str] = []
        self.plain_tokens: list[int] = []

    def emit(self, req: Req, token_ids: list[int], finish_reason: Optional[str],
             logprobs: Optional[list[float]] = None, error: Optional[str] = None,
             top_logprobs: Optional[list] = None) -> None:
        if token_ids:
            self.marks.on_token(req)
        prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None   # sent once, with the first token
        self.items.append(P.TokensItem(req.rid, list(token_ids), finish_reason, error, logprobs, top_logprobs,
                                       self.marks.sampling_iter if token_ids else None, prompt_logprobs))

    def emit_plain(self, rids: list[str], tokens: list[int]) -> None:
        """One bare token for each of `rids` (a decode step's requests that did not finish)."""
        self.plain_rids += rids
        self.plain_tokens += tokens

    def flush(self) -> None:
        self.marks.flush(self.control)          # NOTE: before the tokens they lead up to
        if self.items or self.plain_rids:
            plain = None
            if self.plain_rids:
                plain = P.PlainTokens(self.plain_rids, self.plain_tokens, self.marks.sampling_iter)
                self.plain_rids, self.plain_tokens = [], []
            self.control.send(P.Tokens(worker_id=self.worker_id, items=self.items, plain=plain))
            self.items = []
