"""The hot message: a steady decode step's bare tokens (`Tokens` with no items, only `plain` rows),
encoded and decoded field by field with the checks of protocol.py's schema.

At one stream a worker sends one per step and the router decodes one per token; the generic path
(the record walk, the frozen `PlainTokens` rebuilt from a map and turned back into one) cost
~15-20 µs each way on the scheduler and control threads, beside the forward. The bytes and the
errors are the generic path's; a message of any other shape takes the generic path.
"""
from __future__ import annotations

from typing import Any, Optional

import msgpack

from cluster.wire.checks import Check, ProtocolError, fail
from cluster.wire.messages import PlainTokens, Tokens

KEYS = frozenset(("worker_id", "items", "plain"))


class SteadyTokens:
    def __init__(self, version: int, worker_id: Check, plain_fields: dict[str, Check]):
        """`worker_id` and `plain_fields`: the checks protocol.py's schema runs on these fields."""
        self.version, self.worker_id, self.plain_fields = version, worker_id, plain_fields
        self.plain_keys = frozenset(plain_fields)
        self.paths = {k: f"tokens.plain.{k}" for k in plain_fields}

    @staticmethod
    def is_steady(msg: Any) -> bool:
        return (type(msg) is Tokens and type(msg.items) in (list, tuple) and not msg.items
                and type(msg.plain) is PlainTokens)

    def _plain(self, fields: Any) -> PlainTokens:
        checked = {k: c(fields[k], self.paths[k]) for k, c in self.plain_fields.items()}
        try:
            return PlainTokens(**checked)
        except (TypeError, ValueError) as e:
            fail("tokens.plain", str(e))

    def encode(self, msg: Tokens) -> bytes:
        worker_id, p = self.worker_id(msg.worker_id, "tokens.worker_id"), msg.plain
        plain = self._plain({"rids": p.rids, "token_ids": p.token_ids, "forward_iter": p.forward_iter})
        return msgpack.packb({"v": self.version, "type": Tokens.TYPE, "worker_id": worker_id, "items": [],
                              "plain": {"rids": plain.rids, "token_ids": plain.token_ids,
                                        "forward_iter": plain.forward_iter}}, use_bin_type=True)

    def decode(self, body: dict) -> Optional[Tokens]:
        """`body` (frame 0 less "v" and "type") -> the message, or None when it is not a steady one."""
        plain = body.get("plain")
        if (body.keys() != KEYS or type(body["items"]) is not list or body["items"]
                or type(plain) is not dict or plain.keys() != self.plain_keys):
            return None
        worker_id = self.worker_id(body["worker_id"], "tokens.worker_id")
        rows = self._plain(plain)
        try:
            return Tokens(worker_id=worker_id, items=[], plain=rows)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"tokens: {e}") from None
