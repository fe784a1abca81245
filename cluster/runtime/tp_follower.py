"""A tensor-parallel rank other than 0: `python -m cluster.runtime.tp_follower --rank R ...`, started by
its worker's rank 0 (tp_ranks.TpFollowers). It loads its shard of the model and runs every forward
rank 0 sends it, until rank 0 says stop or goes away."""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys

import msgpack
import torch
import zmq

from cluster.engine.forward_batch import ForwardInput
from cluster.kv_transfer.page_copy import copy_pages
from cluster.sampling_params import SamplingParams

logger = logging.getLogger("pdcluster.tp")

IDLE_POLL_MS = 1000
# stand-ins of the same kind as rank 0's (argmax or not): the same collectives run; the tokens are rank 0's
GREEDY, SAMPLED = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)


def decode_forward(msg: dict) -> ForwardInput:
    n, greedy = len(msg["extend_lens"]), msg["greedy"]
    table = msg["block_table"]
    return ForwardInput(
        input_ids=torch.tensor(msg["input_ids"], dtype=torch.int64), extend_lens=msg["extend_lens"],
        prefix_lens=msg["prefix_lens"], page_tables=msg["page_tables"], sample=msg["sample"],
        sampling=[GREEDY if greedy else SAMPLED] * n, generators=[None] * n, prior_ids=[[] for _ in range(n)],
        min_tokens_left=[0] * n, eos_token_ids=[frozenset()] * n, grammars=[None] * n, future_slots=msg["future_slots"],
        prompt_targets=msg["prompt_targets"], bidirectional_lens=msg["bidirectional_lens"],
        attn_block_sizes=msg["attn_block_sizes"], return_logits=msg["return_logits"],
        logits_lens=msg["logits_lens"], is_decode=msg["is_decode"], all_greedy=greedy,
        block_table=None if table is None else torch.tensor(table, dtype=torch.int64))


def land_import(reader, msg: dict) -> dict:
    """This rank's heads of one request's KV (kv_transfer/rank_read.py), and the answer for rank 0."""
    from cluster.kv_transfer.base import KvTransferError
    job = msg["job"]
    answer = {"op": "imported", "rank": reader.rank, "seq": msg["seq"], "rid": job["rid"],
              "attempt": job["attempt"], "bytes": 0, "error": None}
    try:
        with torch.inference_mode():
            answer["bytes"] = reader.land(msg["transport"], msg["sender"], msg["source"], job)
            if job.get("verify") and job["layers"][1] == reader.pool.num_layers:   # all its layers landed
                answer["sums"] = [[head, value] for head, value in reader.head_checksums(job).items()]
    except KvTransferError as e:
        answer["error"] = [e.reason.value, e.detail]
    except Exception as e:     # noqa: BLE001 - any failure fails that request's KV, not the rank
        logger.exception("KV import of %s failed", job["rid"])
        answer["error"] = ["backend", f"{type(e).__name__}: {e}"]
    return answer


def hash_heads(runner, msg: dict) -> dict:
    """The answer to rank 0's `kv_checksum`: the checksum of each KV head this rank holds."""
    from cluster.kv_transfer.checksum import head_checksums
    from cluster.kv_transfer.head_map import HeadSplit
    first = HeadSplit(runner.config.kv_cache_shape[1], runner.tp.size).first_head(runner.tp.rank)
    with torch.inference_mode():
        sums = head_checksums(runner.kv_pool, msg["pages"], msg["length"], first)
    return {"op": "checksummed", "rank": runner.tp.rank, "seq": msg["seq"], "sums": [list(p) for p in sums.items()]}


def follow_tier(runner, tier, msg: dict):
    """Do rank 0's host-tier write-back or load with this rank's tier (made, or made again, with
    rank 0's page count); -> the tier."""
    from cluster.engine.host_tier import HostTier
    if tier is None or tier.num_pages != msg["num_pages"]:
        tier = HostTier(runner.kv_pool, msg["num_pages"])
    with torch.inference_mode():
        if msg["op"] == "tier_write":
            tier.write(msg["dev"], msg["host"])
        else:
            tier.load_now(msg["host"], msg["dev"])
    return tier


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (rank 0) dies, so no rank outlives its worker."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)   # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass   # elsewhere the idle loop's parent check ends it


def follow(runner, ops_endpoint: str, parent: int, replies=None, reader=None) -> None:
    """Run rank 0's forwards and KV imports, in its order, until it sends stop or goes away."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.connect(ops_endpoint)
    tier = None                      # this rank's host tier, once rank 0's first uses its own
    try:
        while True:
            if not sock.poll(IDLE_POLL_MS):
                if os.getppid() != parent:
                    logger.error("rank 0 is gone: exiting")
                    return
                continue
            msg = msgpack.unpackb(sock.recv())
            if msg["op"] == "stop":
                return
            if msg["op"] == "kv_import":
                replies.send(msgpack.packb(land_import(reader, msg)))
                continue
            if msg["op"] == "kv_checksum":    # prefill with verify: this rank's heads of a request's KV
                replies.send(msgpack.packb(hash_heads(runner, msg)))
                continue
            if msg["op"] in ("tier_write", "tier_load"):   # rank 0's host tier, on this rank's heads
                tier = follow_tier(runner, tier, msg)
                continue
            if msg["op"] == "copy_pages":     # n > 1: siblings forked from one request's KV
                kv = runner.kv_pool.kv
                copy_pages(kv, kv, msg["src"], msg["dst"])
                continue
            runner.forward(decode_forward(msg))
    finally:
        sock.close(linger=0)


def follower_main(argv=None) -> int:
    from cluster.config import load_config
    from cluster.engine.parallel import close_tp, init_tp
    from cluster.kv_transfer.rank_read import rank_source
    from cluster.runtime.worker_main import load_runner, set_threads, setup_logging, uses_shared_pool
    ap = argparse.ArgumentParser(prog="python -m cluster.runtime.tp_follower")
    for flag in ("--rank", "--tp"):
        ap.add_argument(flag, type=int, required=True)
    for flag in ("--init", "--ops", "--replies", "--config", "--worker-id"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--data-host", default="127.0.0.1")
    args = ap.parse_args(argv)
    parent = os.getppid()
    die_with_parent()
    setup_logging(args.worker_id, args.log_dir, args.rank)
    config = load_config(args.config)
    group = config.group_of(args.worker_id)
    set_threads(config, args.worker_id)
    device = config.model.device
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(args.rank)   # CUDA_VISIBLE_DEVICES lists the worker's tp GPUs in rank order
    tp = init_tp(args.rank, args.tp, args.init, device)
    replies = zmq.Context.instance().socket(zmq.PUSH)
    replies.setsockopt(zmq.LINGER, 0)
    replies.connect(args.replies)
    server = reader = None
    try:
        runner = load_runner(config, group, group.path, shared_pool=uses_shared_pool(config, group.role), tp=tp)
        server, reader = kv_endpoints(config, group, runner, args.rank, args.data_host)
        tp.barrier()
        replies.send(msgpack.packb({"op": "ready", "rank": args.rank,
                                    "source": rank_source(runner.kv_pool, runner.kv_segment, server)}))
        logger.info("rank %d of %d ready", args.rank, args.tp)
        follow(runner, args.ops, parent, replies, reader)
    finally:
        for part in (server, reader):
            if part is not None:
                part.close()
        replies.close()
        close_tp(tp)
    return 0


def kv_endpoints(config, group, runner, rank: int, data_host: str):
    """(slice server, rank reader) of a rank: a rank that may prefill for a decode worker serves reads
    of its pool over zmq (when the backend may pick zmq); one that may take KV (decode, a DLLM worker
    that takes remote prefills) reads its heads from prefill ranks. A role that may switch in place
    (prefill, decode, unified) gets both, so its ranks serve whatever role it becomes."""
    from cluster.kv_transfer.rank_read import RankReader
    from cluster.kv_transfer.slice_server import SliceServer
    from cluster.roles import SWITCHABLE_ROLES
    from cluster.wire.curve import keys_for
    curve = keys_for(config.security, [data_host])
    switchable = group.role in SWITCHABLE_ROLES
    server = reader = None
    if switchable and config.kv_transfer.backend != "shm":
        server = SliceServer(runner.kv_pool, data_host, curve)
    if switchable or (group.role == "dllm" and group.prefill != "local"):
        reader = RankReader(runner.kv_pool, rank, runner.tp.size, runner.config.kv_cache_shape[1],
                            config.timeouts.kv_transfer, curve)
    return server, reader


if __name__ == "__main__":
    sys.exit(follower_main())
