"""KV transfer: how a prefilled request's KV reaches the pages its decode worker reserved.

The `kv_batch` control message always travels over the ZeroMQ data plane, with the prefill
batch's `forward_iter`, one per destination decode worker; per request it carries the first
token, the prompt length, the KV attempt number and (with `verify`) the KV checksum. What
moves the bytes is a backend (`[kv_transfer] backend`), each a sender half that prefill packs and
sends with (`sender.py`) and a receiver half that decode lands the KV with (`receiver.py`):

    zmq        the bytes are frames of the kv_batch (any hosts); decode writes them straight
               into its reserved pages
    shm        CPU workers on one host: the prefill pool lives in a shared segment that decode
               maps once and copies pages from
    cuda_ipc   GPUs on one host: decode maps the prefill pool once through CUDA IPC handles
               and copies pages device to device, ordered by CUDA events
    nccl       GPUs on any hosts: NCCL send/recv per (prefill, decode) pair, created lazily
    auto       cuda_ipc for same-host GPUs, shm for same-host CPUs, zmq otherwise (`hub.py`)

Completion is signalled back with `kv_ack` (rids landed, or failed with a reason). With the
page-reading backends (shm, cuda_ipc) the prefill pages stay allocated until then.

Verified handoff (`[kv_transfer] verify = true`; off by default because it doubles a
device-to-device handoff, BENCHMARKS.md): the prefill side checksums each request's KV in handoff
layout (xxh3-64 on the CPU, `fold64` on a GPU: `checksum.py`); the decode side recomputes it
over what landed before the request's pages go live. A mismatch is acked as failed with
reason "checksum"; the prefill worker prefills the request again with the next attempt
number (decode keeps the pages reserved and ignores late items of older attempts), at most
`MAX_KV_ATTEMPTS` times; it is counted in `pdcluster:kv_transfer_failures_total{reason}`.

TEST-ONLY fault injection (`faults.py`), like SGLang's DISAGGREGATION_TEST_FAILURE_PROB:
    PDCLUSTER_TEST_KV_FAULT="drop=0.1,corrupt=0.1,seed=7"
set in a prefill worker's environment, drops (leaves out of its kv_batch: it times out, and
the request fails naming the missing ack) or corrupts (flips bytes after the checksum, or
the checksum itself for page-reading backends: with verify on, decode rejects it and it is
prefilled again; with verify off the corruption goes through) that share of transferred
requests. Never set it in production.

Layer-wise streaming (`[kv_transfer] layerwise`, `layerwise.py`): each layer of a finishing
request leaves in its own `kv_layers` message as soon as the forward computed it; the kv_batch
then moves no bytes. `true` for every peer, `false` for none, `"auto"` (the default) for peers
reached through zmq, where it measures faster (`TransferHub.streams_layers`).
"""
from cluster.kv_transfer.base import ImportFence, KvTransferError, Packed
from cluster.kv_transfer.faults import ENV as FAULT_ENV, KvFaults, KvFaultSpec
from cluster.kv_transfer.hub import TransferHub, choose_backend, is_same_host
from cluster.kv_transfer.receiver import KvReceiver
from cluster.kv_transfer.sender import KvSender

MAX_KV_ATTEMPTS = 3

__all__ = ["FAULT_ENV", "ImportFence", "KvFaults", "KvFaultSpec", "KvReceiver", "KvSender",
           "KvTransferError", "MAX_KV_ATTEMPTS", "Packed", "TransferHub", "choose_backend",
           "is_same_host"]
