"""What a decode step's packed rows cost the router's control thread, per row, with the caches
evicted between steps as they are in the running router (the kernel's sends and the other
processes run between two steps).

    PYTHONPATH=$PWD python benchmarks/dispatcher_rows.py [--streams 256] [--steps 60]

Each step decodes one real `tokens` message (`PlainTokens` of N rows) and hands it on as the
dispatcher does (`Dispatcher._plain_tokens`, `deliver_all`), after evicting 32 MiB. The
ablations leave one per-row touch out (the trace's arrival, the attempt check, the output
ids), or stop after the decode or the request lookup, so the difference is that touch's cost.
Median per step, divided by N. It measures whatever `cluster` PYTHONPATH names.
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import random
import statistics
import time

from cluster.router.dispatcher import Dispatcher
from cluster.router.mailbox import Mailbox, deliver_all
from cluster.router.request_state import Placement, RequestState
from cluster.router.request_trace import RequestTrace, TokenArrival
from cluster.sampling_params import SamplingParams
from cluster.wire import protocol

TWO_LISTS = len(inspect.signature(deliver_all).parameters) == 3   # else a tree with (sink, token) pairs
VARIANTS = ("dispatcher", "no_trace", "no_attempt_check", "no_output_ids", "lookup_only", "decode_only")


def ablated(requests: dict, leave_out: str):
    """`Dispatcher._plain_tokens` with one touch left out."""
    def plain_tokens(sender: str, rows, now: float):
        arrival = TokenArrival(time.time(), 1, rows.forward_iter)
        sinks, token_ids = [], []
        for rid, token_id in zip(rows.rids, rows.token_ids):
            st = requests.get(rid)
            if st is None or (leave_out != "no_attempt_check" and st.token_source != sender):
                continue
            if leave_out != "no_output_ids":
                st.output_ids.append(token_id)
            if leave_out != "no_trace" and st.trace is not None:
                st.trace.add_arrival(arrival)
            st.last_progress = now
            sinks.append(st.sink)
            token_ids.append(token_id)
        return sinks, token_ids
    return plain_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    dispatcher = Dispatcher.__new__(Dispatcher)            # only its request table is used
    dispatcher.requests, spread, rids = {}, [], []
    for _ in range(args.streams):
        rid = f"{random.getrandbits(128):032x}"
        st = RequestState(rid, "m", "pd", list(range(130)), SamplingParams(max_tokens=1 << 20), Mailbox(loop))
        st.placement = Placement.single("unified", "unified-0")
        st.trace = RequestTrace(rid, "m", "unified")
        dispatcher.requests[f"{rid}.0"] = st
        rids.append(f"{rid}.0")
        spread.append([object() for _ in range(200)])     # the requests' objects apart in memory, as in a router
    frames = protocol.encode(protocol.Tokens("unified-0", [], protocol.PlainTokens(rids, [260] * args.streams, 1)))
    evict = bytearray(32 << 20)
    took: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for variant in VARIANTS:
            evict[::64] = bytes(len(evict) // 64)
            t0 = time.perf_counter()
            msg = protocol.decode(frames)
            if variant == "lookup_only":
                [dispatcher.requests.get(rid) for rid in msg.plain.rids]
            elif variant != "decode_only":
                rows = (dispatcher._plain_tokens if variant == "dispatcher" else
                        ablated(dispatcher.requests, variant))("unified-0", msg.plain, 0.0)
                if isinstance(rows, tuple) and not TWO_LISTS:
                    rows = list(zip(*rows))
                deliver_all([], *rows) if isinstance(rows, tuple) else deliver_all([], rows)
                loop._ready.clear()                        # the hand-off's callback, never run here
            took[variant].append(time.perf_counter() - t0)
    for variant in VARIANTS:
        print(f"{variant:18s} {statistics.median(took[variant]) / args.streams * 1e6:5.2f} us/row")


if __name__ == "__main__":
    main()
