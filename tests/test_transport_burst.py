"""A burst read by a callback-driven socket loop: what each callback sends leaves after that callback,
not after the burst (the dispatcher places each front end's submit on its I/O thread; a 256-request
burst held every Generate until the last submit was placed: ~0.45 s of TTFT on an H100)."""
from __future__ import annotations

import threading
import time

from cluster.wire import protocol as P
from cluster.wire.transport import ControlClient, ControlServer

T = 10.0
BURST = 64
PLACE_S = 0.01         # each message's handling: the burst takes >= 0.64 s on the I/O thread
HANDSHAKE_S = 30.0     # bounds a hang only


def test_a_reply_sent_from_the_callback_leaves_before_the_burst_is_handled():
    """The second burst message's callback waits until the client holds the first reply: a loop that
    sent only after the burst would leave it waiting out HANDSHAKE_S (`late`), one that sends after
    each callback releases it at once, however slow the machine (a 0.32 s wall-clock bound on the
    first reply was a race on loaded cores)."""
    handled, late = [], []
    first_received = threading.Event()
    server = None

    def on_message(got):
        sender, msg = got
        if msg.forward_ct == 2 and not first_received.wait(HANDSHAKE_S):
            late.append(msg.forward_ct)
        time.sleep(PLACE_S)                # placement, trace, encode: the dispatcher's own work
        handled.append(time.monotonic())
        server.send(sender, P.Abort(f"r{msg.forward_ct}", "placed"))

    server = ControlServer("tcp://127.0.0.1:0", on_message=on_message)
    try:
        with ControlClient(server.endpoint, "frontend-0") as client:
            client.send(P.Heartbeat("frontend-0", 0, P.WorkerGauges()))       # connected first
            assert client.recv(T) == P.Abort("r0", "placed")
            for i in range(BURST):
                client.send(P.Heartbeat("frontend-0", i + 1, P.WorkerGauges()))
            first = client.recv(HANDSHAKE_S)
            first_at = time.monotonic()
            first_received.set()
            rest = [client.recv(T) for _ in range(BURST - 1)]
        assert [first, *rest] == [P.Abort(f"r{i + 1}", "placed") for i in range(BURST)]   # in order, none lost
        # the first reply came after its own handling, before the rest of the burst was handled
        assert late == [] and first_at < handled[2], (late, first_at, handled[:3])
    finally:
        first_received.set()
        server.close()
