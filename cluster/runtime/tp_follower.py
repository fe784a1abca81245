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


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (rank 0) dies, so no rank outlives its worker."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)   # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass   # elsewhere the idle loop's parent check ends it


def follow(runner, ops_endpoint: str, parent: int) -> None:
    """Run rank 0's forwards until it sends stop or goes away."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.connect(ops_endpoint)
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
            runner.forward(decode_forward(msg))
    finally:
        sock.close(linger=0)


def follower_main(argv=None) -> int:
    from cluster.config import load_config
    from cluster.engine.parallel import close_tp, init_tp
    from cluster.runtime.worker_main import load_runner, set_threads, setup_logging
    ap = argparse.ArgumentParser(prog="python -m cluster.runtime.tp_follower")
    for flag in ("--rank", "--tp"):
        ap.add_argument(flag, type=int, required=True)
    for flag in ("--init", "--ops", "--config", "--worker-id"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--log-dir", default=None)
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
    try:
        runner = load_runner(config, group, group.path, tp=tp)
        tp.barrier()
        logger.info("rank %d of %d ready", args.rank, args.tp)
        follow(runner, args.ops, parent)
    finally:
        close_tp(tp)
    return 0


if __name__ == "__main__":
    sys.exit(follower_main())
