"""The wire message types: one frozen dataclass per `type` of DESIGN.md's message table.

Their codec (field checks, encode, decode) is `cluster/protocol.py`, which re-exports them;
import them from there. List and dict fields hold plain values exactly as they travel
(token ids as list[int], gauges as dict), except `KvBatch.tensors` (torch.Tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence, Union


@dataclass(frozen=True, slots=True)
class Register:                                   # worker -> router
    TYPE: ClassVar[str] = "register"
    worker_id: str
    role: str                                     # prefill | decode | unified | dllm
    model: str
    capacity: dict                                # num_pages, page_size, max_running_requests
    kv_fingerprint: dict                          # num_layers, num_kv_heads, head_dim, dtype, page_size
    data_addr: str = ""                           # "" when the worker has no data plane
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:                                  # worker -> router
    TYPE: ClassVar[str] = "heartbeat"
    worker_id: str
    forward_ct: int
    stats: dict = field(default_factory=dict)     # gauge name -> int | float


@dataclass(frozen=True, slots=True)
class Generate:                                   # router -> worker
    TYPE: ClassVar[str] = "generate"
    rid: str
    input_ids: list
    sampling: dict                                # SamplingParams.to_wire()
    peer: Optional[dict] = None                   # {worker_id, data_addr} of the other side
    model: str = ""
    extra: dict = field(default_factory=dict)     # per-request overrides (str/int/float/bool)
    output_ids: list = field(default_factory=list)  # tokens already generated (resume)


@dataclass(frozen=True, slots=True)
class DecodeReady:                                # decode -> prefill (data plane)
    TYPE: ClassVar[str] = "decode_ready"
    rid: str
    decode_worker_id: str
    decode_data_addr: str


@dataclass(frozen=True, slots=True)
class KvBatch:                                    # prefill -> decode (data plane)
    TYPE: ClassVar[str] = "kv_batch"
    forward_iter: int
    prefill_worker_id: str
    reqs: list                                    # {rid, first_token, prompt_len, first_logprob}
    tensors: list = field(compare=False)          # per req: [layers, 2, prompt_len, kv_heads, head_dim]


@dataclass(frozen=True, slots=True)
class KvAck:                                      # decode -> prefill (data plane)
    TYPE: ClassVar[str] = "kv_ack"
    rids: list
    failed: dict                                  # rid -> reason
    decode_worker_id: str


@dataclass(frozen=True, slots=True)
class Tokens:                                     # decode / unified / dllm -> router
    TYPE: ClassVar[str] = "tokens"
    worker_id: str
    items: list                                   # {rid, token_ids, finish_reason, error, logprobs}


@dataclass(frozen=True, slots=True)
class Abort:                                      # router -> worker
    TYPE: ClassVar[str] = "abort"
    rid: str
    reason: str


@dataclass(frozen=True, slots=True)
class Error:                                      # worker -> router: the request fails
    TYPE: ClassVar[str] = "error"
    rid: str
    reason: str
    worker_id: str


@dataclass(frozen=True, slots=True)
class Batch:                                      # a ScheduleBatch crossing a process
    TYPE: ClassVar[str] = "batch"
    batch: dict                                   # ScheduleBatch.to_wire(), forward_iter included


@dataclass(frozen=True, slots=True)
class Shutdown:                                   # router -> worker: graceful stop
    TYPE: ClassVar[str] = "shutdown"
    reason: str = ""


Message = Union[Register, Heartbeat, Generate, DecodeReady, KvBatch, KvAck, Tokens, Abort,
                Error, Batch, Shutdown]


def tokens_item(rid: str, token_ids: Sequence[int], finish_reason: Optional[str] = None,
                error: Optional[str] = None, logprobs: Optional[Sequence[float]] = None) -> dict:
    """One entry of `Tokens.items`."""
    return {"rid": rid, "token_ids": list(token_ids), "finish_reason": finish_reason,
            "error": error, "logprobs": None if logprobs is None else list(logprobs)}


def kv_req(rid: str, first_token: int, prompt_len: int,
           first_logprob: Optional[float] = None) -> dict:
    """One entry of `KvBatch.reqs`."""
    return {"rid": rid, "first_token": first_token, "prompt_len": prompt_len,
            "first_logprob": first_logprob}
