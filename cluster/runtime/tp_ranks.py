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


class ImportLedger:
    """Rank 0's account of the import jobs it sent its other ranks and their answers (in order per rank)."""
    MAX_TRACKED = 4096

    def __init__(self) -> None:
        self.num_sent = 0
        self.answered: dict[int, int] = {}                 # rank -> last seq answered
        self.results: dict[tuple, dict] = {}               # (rid, attempt) -> {rank: bytes | error}
        self.head_sums: dict[tuple, dict] = {}             # (rid, attempt) -> {KV head: checksum} (verify)

    def sent(self) -> int:
        self.num_sent += 1
        return self.num_sent

    def all_answered(self, num_ranks: int) -> bool:
        return len(self.answered) == num_ranks and min(self.answered.values()) >= self.num_sent

    def answer(self, msg: dict) -> None:
        self.answered[msg["rank"]] = msg["seq"]
        ranks = self.results.setdefault((msg["rid"], msg["attempt"]), {})
        prev = ranks.get(msg["rank"], 0)
        if msg["error"] is not None or not isinstance(prev, int):
            ranks[msg["rank"]] = prev if not isinstance(prev, int) else msg["error"]   # the first error stays
        else:
            ranks[msg["rank"]] = prev + msg["bytes"]
        if msg.get("sums"):
            self.head_sums.setdefault((msg["rid"], msg["attempt"]), {}).update(dict(msg["sums"]))
        for tracked in (self.results, self.head_sums):         # aborted requests are never taken
            while len(tracked) > self.MAX_TRACKED:
                tracked.pop(next(iter(tracked)))

    def take(self, rid: str, attempt: int, num_ranks: int) -> tuple[list[int], dict[int, int]]:
        """-> (bytes each other rank landed, their KV heads' checksums where they verified)."""
        from cluster.kv_transfer.base import KvTransferError
        ranks = self.results.pop((rid, attempt), {})
        sums = self.head_sums.pop((rid, attempt), {})
        for rank, got in sorted(ranks.items()):
            if not isinstance(got, int):
                reason, detail = got
                raise KvTransferError(reason, f"rank {rank}: {detail}")
        return [ranks.get(rank, 0) for rank in range(1, num_ranks + 1)], sums


class TpFollowers:
    """Rank 0's side: starts ranks 1..tp-1, sends them each forward, and watches them."""

    def __init__(self, worker_id: str, tp: int, argv: list[str]):
        """`argv`: the follower's command line after `--rank R`, common to every rank."""
        self.worker_id, self.tp = worker_id, tp
        self.dir = tempfile.mkdtemp(prefix=f"pdcluster-{worker_id}-tp-")   # 0700: ours alone
        self.init_method = f"file://{self.dir}/rendezvous"
        self.ctx = zmq.Context.instance()
        self.sockets, self.procs = [], []
        self.replies = self.ctx.socket(zmq.PULL)       # ready and import answers from every rank
        self.replies.setsockopt(zmq.LINGER, 0)
        self.replies.bind(f"ipc://{self.dir}/replies")
        self.sources: dict[int, dict] = {}             # rank -> how its pool is read (rank_read.rank_source)
        self.imports = ImportLedger()
        self._num_checksums = 0
        self._checksums: dict[int, tuple[int, list]] = {}   # rank -> (seq, [[KV head, checksum], ...])
        for rank in range(1, tp):
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self._ops_endpoint(rank))
            self.sockets.append(sock)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "cluster.runtime.tp_follower", "--rank", str(rank), "--tp", str(tp),
                 "--init", self.init_method, "--ops", self._ops_endpoint(rank),
                 "--replies", f"ipc://{self.dir}/replies", *argv]))
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()   # NOTE: forwards go out on the forward thread, imports on the scheduler's
        self._closed = False

    def _ops_endpoint(self, rank: int) -> str:
        return f"ipc://{self.dir}/ops{rank}"

    def send_forward(self, fi: ForwardInput, plain_greedy: bool) -> None:
        self._send_all(encode_forward(fi, plain_greedy))

    def _send_all(self, frame: bytes) -> None:
        with self._send_lock:
            for sock in self.sockets:
                sock.send(frame, copy=False)

    def wait_ready(self, timeout_s: float) -> dict[int, dict]:
        """Every other rank loaded: rank -> its KV source (what a decode rank reads its pool through)."""
        deadline = time.monotonic() + timeout_s
        while len(self.sources) < self.tp - 1:
            msg = self._recv_reply(deadline)
            if msg is None:
                raise TimeoutError(f"{self.worker_id}: ranks {sorted(set(range(1, self.tp)) - set(self.sources))} "
                                   f"not ready within {timeout_s:g}s")
            if msg["op"] == "ready":
                self.sources[msg["rank"]] = msg["source"]
        return self.sources

    def send_page_copy(self, src_pages: list[int], dst_pages: list[int]) -> None:
        """Each other rank copies these pages of its pool (a fork's partial page), in order with the forwards."""
        self._send_all(msgpack.packb({"op": "copy_pages", "src": src_pages, "dst": dst_pages}))

    def send_tier(self, op: str, num_pages: int, host_pages: list[int], device_pages: list[int]) -> None:
        """Each other rank does what rank 0's host tier did (`tier_write` or `tier_load`) with its
        own heads, in order with the forwards (engine/host_tier.py)."""
        self._send_all(msgpack.packb({"op": op, "num_pages": num_pages, "host": list(host_pages),
                                      "dev": list(device_pages)}))

    def send_import(self, transport: str, sender: str, source: dict, job: dict) -> None:
        """Each other rank lands its heads of one request's KV (rank_read.RankReader), after the
        forwards already sent and before the ones that follow."""
        self._send_all(msgpack.packb({"op": "kv_import", "seq": self.imports.sent(), "transport": transport,
                                      "sender": sender, "source": source, "job": job}))

    def settle(self, rid: str, attempt: int, timeout_s: float) -> tuple[list[int], dict[int, int]]:
        """Wait (bounded) until every rank answered every import sent so far; -> (the bytes each
        other rank landed for this KV attempt, the checksums of their KV heads when the job asked
        for them). Raises KvTransferError when a rank refused it or did not answer in time."""
        from cluster.kv_transfer.base import KvTransferError
        deadline = time.monotonic() + timeout_s
        while not self.imports.all_answered(self.tp - 1):
            if not self._take_reply(deadline):
                raise KvTransferError("timeout", f"ranks did not land the KV of {rid} within {timeout_s:g}s")
        return self.imports.take(rid, attempt, self.tp - 1)

    def send_checksum(self, pages: list[int], length: int) -> None:
        """Each other rank hashes its KV heads of these pages (prefill, `verify`), after the
        forwards already sent, so after the forward that wrote them."""
        self._num_checksums += 1
        self._send_all(msgpack.packb({"op": "kv_checksum", "seq": self._num_checksums, "pages": pages,
                                      "length": length}))

    def collect_checksums(self, timeout_s: float) -> dict[int, int]:
        """{KV head: checksum} of every other rank's heads for the last `send_checksum` (bounded)."""
        from cluster.kv_transfer.base import KvTransferError
        deadline = time.monotonic() + timeout_s
        while any(self._checksums.get(r, (0,))[0] < self._num_checksums for r in range(1, self.tp)):
            if not self._take_reply(deadline):
                raise KvTransferError("timeout", f"ranks did not hash their KV heads within {timeout_s:g}s")
        return {head: value for r in range(1, self.tp) for head, value in self._checksums[r][1]}

    def _take_reply(self, deadline: float) -> bool:
        """Record one answer of another rank; False when none came before `deadline`."""
        msg = self._recv_reply(deadline)
        if msg is None:
            return False
        if msg["op"] == "imported":
            self.imports.answer(msg)
        elif msg["op"] == "checksummed":
            self._checksums[msg["rank"]] = (msg["seq"], msg["sums"])
        return True

    def _recv_reply(self, deadline: float):
        if not self.replies.poll(max(0, int(1000 * (deadline - time.monotonic())))):
            return None
        return msgpack.unpackb(self.replies.recv())

    def watch(self) -> "TpFollowers":
        """A thread that takes the worker down when a follower ends (the launcher restarts it whole)."""
        def loop():
            while not self._closed:
                self.exit_if_rank_died()
                time.sleep(WATCH_INTERVAL_S)
        threading.Thread(target=loop, name="tp-watch", daemon=True).start()
        return self

    def exit_if_rank_died(self, wait_s: float = 0.0) -> None:
        """If another rank ended (checked for up to `wait_s`), end this process: rank death is worker
        death, so its requests move on as a dead worker's do (a batch that failed because a rank died
        must not fail its requests for good)."""
        deadline = time.monotonic() + wait_s
        while not self._closed:
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() is not None and not self._closed:
                    logger.error("%s rank %d exited with %s: the worker goes down with it",
                                 self.worker_id, rank, p.returncode)
                    self.kill()
                    os._exit(EXIT_RANK_DIED)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

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
        self.replies.close(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)
