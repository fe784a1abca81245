"""A request's mailbox: events handed from the dispatcher's thread to the request's coroutine.

The dispatcher calls `deliver_all` once per worker message: one `call_soon_threadsafe` per
event loop for every request the message touches (a decode step of 256 streams is one
wake-up of the HTTP loop, not 256), and on the loop each mailbox appends its events and
resolves its one waiting future. The coroutine takes everything that arrived since it last
looked (`take`), in order. No asyncio.Queue and no `wait_for` task per event: a token costs
one list append and at most one future resolution.

A stream under way may set `steady`: a plain token (one token, nothing else) that arrives
while its coroutine waits here with nothing queued is written to the client from this
callback instead (steady_stream.put_tokens, once for the step's plain tokens of every
stream on the loop), with no coroutine woken. The order holds: a waiting coroutine has sent everything it took, and whatever `steady`
refuses (a paused or gone client) is queued as usual, behind which the next tokens queue.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

from cluster.router.request_state import Event, TokensEvent
from cluster.router.steady_stream import SteadyStream, put_tokens


class Mailbox:
    """One request's events; `self(event)` may be called from any thread."""

    __slots__ = ("loop", "events", "waiter", "steady")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: list[Event] = []
        self.waiter: Optional[asyncio.Future] = None
        self.steady: Optional[SteadyStream] = None   # its plain tokens' writer to the client

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.put, event)

    def put(self, event: Event) -> None:
        """On the loop's thread."""
        if type(event) is TokensEvent and event.is_plain:
            return self.put_token(event.token_ids[0])
        self._queue(event)

    def put_token(self, token_id: int) -> None:
        """A plain token, on the loop's thread: written by `steady` when the coroutine waits
        here with nothing queued and the client takes it, else queued as an event."""
        put_tokens(((self, token_id),))

    def queue_token(self, token_id: int) -> None:
        """A plain token for the coroutine, on the loop's thread."""
        self._queue(TokensEvent([token_id], None, None))

    def _queue(self, event: Event) -> None:
        self.events.append(event)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self, timeout: Optional[float] = None) -> list[Event]:
        """Every event not taken yet, waiting for the first up to `timeout` seconds ([] then)."""
        if not self.events:
            self.waiter = waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _wake, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
        events, self.events = self.events, []
        return events


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RemoteSink:
    """A request admitted by a front-end process: its events leave in that front end's next
    `frontend_events` message (`outbox.send_events(frontend_id, [(rid, event), ...], [(rid,
    plain token id), ...])`)."""

    __slots__ = ("outbox", "frontend_id", "rid", "key")

    def __init__(self, outbox, frontend_id: str, rid: str):
        self.outbox, self.frontend_id, self.rid = outbox, frontend_id, rid
        self.key = (outbox, frontend_id)                   # deliver_all's grouping, built once

    def __call__(self, event: Event) -> None:
        self.outbox.send_events(self.frontend_id, [(self.rid, event)], [])


def deliver_all(pairs: list[tuple[Callable[[Event], None], Event]],
                plain: list[tuple[Callable[[Event], None], int]] = ()) -> None:
    """Hand one message's events to their requests, waking each event loop once for all of
    them and sending each front end one message. `plain`: (sink, token id) of requests that
    got one token and nothing else, after `pairs` (no event object is built for them unless
    one must be queued). Order per request is kept. Any other sink is called directly."""
    by_loop: dict = {}
    by_frontend: dict = {}
    for i, rows in enumerate((pairs, plain)):
        for row in rows:                                   # NOTE: per token: no list or tuple built per row
            sink, event = row
            if isinstance(sink, Mailbox):
                lists = by_loop.get(sink.loop)
                if lists is None:
                    lists = by_loop[sink.loop] = ([], [])
                lists[i].append(row)
            elif isinstance(sink, RemoteSink):
                lists = by_frontend.get(sink.key)
                if lists is None:
                    lists = by_frontend[sink.key] = ([], [])
                lists[i].append((sink.rid, event))
            else:
                sink(event if i == 0 else TokensEvent([event], None, None))
    for loop, (events, tokens) in by_loop.items():
        loop.call_soon_threadsafe(_put_all, events, tokens)
    for (outbox, frontend_id), (events, tokens) in by_frontend.items():
        outbox.send_events(frontend_id, events, tokens)


def _put_all(events: list, tokens: list) -> None:
    for mailbox, event in events:
        mailbox.put(event)
    if tokens:
        put_tokens(tokens)
