"""A step's steady tokens, written to their clients from the one wake-up of the HTTP loop that
hands the step over (mailbox.py), with no coroutine woken per stream.

Once a stream is under way (its first token sent; no tools, logprobs or echo), its mailbox
holds a `SteadyStream`, and `put_tokens` writes each plain token that arrives while the
stream's coroutine waits with nothing queued: it does what `RouterService.deltas` and the
stream's chunk would do with such a token (count it, observe its TTFT or ITL, detokenize it,
one SSE event when there is text to send) and writes the event to the connection as one
HTTP chunk (the framing of event_stream.ChunkWire). A token it cannot write (the client
cannot take more, or the coroutine is not waiting) is queued for the coroutine; a failure
here fails the request with an error event, as one in `deltas` does.

NOTE: this runs once per token of every stream, each time with caches the kernel's sends of
the step's other tokens have evicted: every object read costs about a cache miss, so one
slotted object per stream holds what the write needs directly (no closure cells, no bound
methods, no ChunkWire in between), the clock is read once per step, and the ITL histogram
is bumped in place.
"""
from __future__ import annotations

import logging
import time
from bisect import bisect_left
from json.encoder import encode_basestring_ascii

from cluster.router.request_state import FailedEvent

log = logging.getLogger("pdcluster.router")


class SteadyStream:
    """What one stream's steady token needs, read directly by `put_tokens`."""

    __slots__ = ("service", "gen", "detokenizer", "text", "flow", "transport", "head", "tail", "size")

    def __init__(self, service, gen, wire):
        """`gen`'s plain tokens -> `wire` (a ChunkWire); `service`: its RouterService."""
        self.service, self.gen = service, gen
        self.text = gen.text
        # no stop string to hold back: the text is the detokenizer's, one call less per token
        self.detokenizer = gen.text.detokenizer if not gen.text.hold_back else None
        self.flow, self.transport = wire.flow, wire.transport
        self.head, self.tail = gen.writer.text_template()
        self.size = len(self.head) + len(self.tail)


def put_tokens(rows) -> None:
    """[(mailbox, token id)] of one step, on the loop's thread, in order: each token to its
    stream's client when its mailbox is steady and its coroutine waits with nothing queued,
    else queued for the coroutine (`Mailbox.queue_token`)."""
    now = time.monotonic()                 # one clock read: the step's tokens arrived together
    for mailbox, token_id in rows:
        s = mailbox.steady
        # NOTE: a waiter not done means nothing is queued (whatever is queued resolves it)
        if (s is None or (waiter := mailbox.waiter) is None or waiter.done()
                or s.flow.write_paused or s.transport.is_closing()):
            mailbox.queue_token(token_id)
            continue
        gen = s.gen
        try:
            gen.num_output += 1
            last = gen.last_token_at
            if last is None:                   # the first token (TTFT), as `deltas` counts it
                gen.first_token_at = now
                s.service.metrics.ttft.observe(now - gen.arrival)
            else:                              # LoopHistogram.observe, inline
                itl = s.service.metrics.itl
                itl.counts[bisect_left(itl.bounds, now - last)] += 1
                itl.sum += now - last
            gen.last_token_at = now
            det = s.detokenizer
            delta = det.add_one(token_id) if det is not None else s.text.add_token(token_id)
            if delta:
                text = encode_basestring_ascii(delta).encode()
                # HTTP/1.1 chunked framing, as uvicorn's would be, around head + text + tail
                s.transport.write(b"%x\r\n%b%b%b\r\n" % (s.size + len(text), s.head, text, s.tail))
        except Exception as e:
            _fail(s, e)
            mailbox.queue_token(token_id)      # behind the failure: the coroutine wakes


def _fail(s: SteadyStream, e: Exception) -> None:
    gen = s.gen
    log.exception("stream of %s failed", gen.st.rid)
    gen.mailbox.steady = None
    s.service.dispatcher.abort(gen.st, "router failure")
    gen.mailbox.events.append(FailedEvent(500, f"internal error: {type(e).__name__}: {e}"))
