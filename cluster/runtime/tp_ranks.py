"""A worker of `tp` ranks: rank 0 is the worker (sockets, scheduler, logs, metrics); ranks
1..tp-1 are processes it starts that run the same forwards on the same batches.

Rank 0's `ModelRunner.forward` first sends the forward's input to every other rank (`TpFollowers`,
msgpack over a PUSH socket per rank, in a private directory); each follower runs the identical
forward, its collectives meeting rank 0's inside the model. Followers get only what the forward
computes with: no sampling parameters, grammars or generators. They sample with stand-in
parameters of the same kind (argmax or not, so every rank takes the same collectives) and then
take rank 0's tokens (`ModelRunner.forward` broadcasts them). forward_iter stays rank 0's.

Failure: a rank that dies takes the worker down whole. Rank 0 watches its followers and exits
(killing the rest) when one ends; a follower dies with rank 0 (parent-death signal, and it
checks its parent while idle). A collective that outlasts the group's timeout raises, which
fails the batch on rank 0 and ends a follower.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import zmq

from cluster.engine.forward_batch import ForwardInput

logger = logging.getLogger("pdcluster.tp")

WATCH_INTERVAL_S = 0.5
EXIT_RANK_DIED = 4


def encode_forward(fi: ForwardInput, plain_greedy: bool) -> bytes:
    """What a follower's forward needs of `fi`: the tokens, their KV places and which rows give
    logits (tp_follower.decode_forward reads it)."""
    return msgpack.packb({
        "op": "forward", "input_ids": fi.input_ids.tolist(), "extend_lens": fi.extend_lens,
        "prefix_lens": fi.prefix_lens, "page_tables": fi.page_tables, "sample": fi.sample,
        "future_slots": fi.future_slots, "prompt_targets": fi.prompt_targets,
        "bidirectional_lens": fi.bidirectional_lens, "attn_block_sizes": fi.attn_block_sizes,
        "return_logits": fi.return_logits, "logits_lens": fi.logits_lens, "is_decode": fi.is_decode,
        "block_table": None if fi.block_table is None else fi.block_table.tolist(), "greedy": plain_greedy})


class TpFollowers:
    """Rank 0's side: starts ranks 1..tp-1, sends them each forward, and watches them."""

    def __init__(self, worker_id: str, tp: int, argv: list[str]):
        """`argv`: the follower's command line after `--rank R`, common to every rank."""
        self.worker_id, self.tp = worker_id, tp
        self.dir = tempfile.mkdtemp(prefix=f"pdcluster-{worker_id}-tp-")   # 0700: ours alone
        self.init_method = f"file://{self.dir}/rendezvous"
        self.ctx = zmq.Context.instance()
        self.sockets, self.procs = [], []
        for rank in range(1, tp):
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self._ops_endpoint(rank))
            self.sockets.append(sock)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "cluster.runtime.tp_follower", "--rank", str(rank), "--tp", str(tp),
                 "--init", self.init_method, "--ops", self._ops_endpoint(rank), *argv]))
        self._lock = threading.Lock()
        self._closed = False

    def _ops_endpoint(self, rank: int) -> str:
        return f"ipc://{self.dir}/ops{rank}"

    def send_forward(self, fi: ForwardInput, plain_greedy: bool) -> None:
        frame = encode_forward(fi, plain_greedy)
        for sock in self.sockets:
            sock.send(frame, copy=False)

    def watch(self) -> "TpFollowers":
        """A thread that takes the worker down when a follower ends (the launcher restarts it whole)."""
        def loop():
            while not self._closed:
                for rank, p in enumerate(self.procs, start=1):
                    if p.poll() is not None and not self._closed:
                        logger.error("%s rank %d exited with %s: the worker goes down with it",
                                     self.worker_id, rank, p.returncode)
                        self.kill()
                        os._exit(EXIT_RANK_DIED)
                time.sleep(WATCH_INTERVAL_S)
        threading.Thread(target=loop, name="tp-watch", daemon=True).start()
        return self

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(timeout=10)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the followers (a stop op, then kill what is left) and remove the directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in self.sockets:
            sock.send(msgpack.packb({"op": "stop"}), zmq.NOBLOCK)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        for sock in self.sockets:
            sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
