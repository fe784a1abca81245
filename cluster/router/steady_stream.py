"""A stream's steady tokens, written to the client from the one wake-up of the HTTP loop that
hands it a worker step (mailbox.py), with no coroutine woken per stream.

Once a stream is under way (its first token sent; no tools, logprobs or echo), its mailbox
hands each plain token that arrives while the stream's coroutine waits with nothing queued to
the writer built here. The writer does what `RouterService.deltas` and the stream's chunk would
do with such a token (count it, observe its TTFT or ITL, detokenize it, one SSE event when
there is text to send) and writes the event to the connection as one HTTP chunk
(event_stream.ChunkWire). False (the token is then queued for the coroutine) while the client
cannot take more; a failure here fails the request with an error event, as one in `deltas` does.

NOTE: this runs once per token of every stream, each time with caches the kernel's send of
the token before it has evicted: every object on the path costs about as much as its
bytecode, so the writer holds what it needs directly and builds the chunk in one step (the
request's event template around the JSON-escaped text).
"""
from __future__ import annotations

import logging
import time
from json.encoder import encode_basestring_ascii
from typing import Callable

from cluster.router.request_state import FailedEvent

log = logging.getLogger("pdcluster.router")


def steady_writer(service, gen, wire) -> Callable[[int], bool]:
    """`gen`'s plain tokens -> `wire` (a ChunkWire); `service`: its RouterService."""
    metrics, monotonic = service.metrics, time.monotonic
    observe_itl, add_token = metrics.itl.observe, gen.text.add_token
    head, tail = gen.writer.text_template()
    is_writable, write_parts = wire.is_writable, wire.write_parts

    def write_token(token_id: int) -> bool:
        if not is_writable():
            return False
        try:
            now = monotonic()
            gen.num_output += 1
            last = gen.last_token_at
            if last is None:                           # the first token (TTFT), as `deltas` counts it
                gen.first_token_at = now
                metrics.ttft.observe(now - gen.arrival)
            else:
                observe_itl(now - last)
            gen.last_token_at = now
            delta = add_token(token_id)
            if delta:
                write_parts(head, encode_basestring_ascii(delta).encode(), tail)
        except Exception as e:
            log.exception("stream of %s failed", gen.st.rid)
            gen.mailbox.steady = None
            service.dispatcher.abort(gen.st, "router failure")
            gen.mailbox.events.append(FailedEvent(500, f"internal error: {type(e).__name__}: {e}"))
            return False                   # queued behind the failure: the coroutine wakes
        return True
    return write_token
