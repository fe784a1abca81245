"""The wire message types: one frozen dataclass per message `type` (docs/reference/messages.md),
and the small frozen items nested inside them (`TokensItem`, `PlainTokens`, the request marks;
the KV handoff's `Peer`, `KvReq`, `KvSpan`, `KvFailed` from kv_items.py; `HistogramSample`,
`WorkerGauges` from gauges.py; the sampling parameters travel as `SamplingParams` itself).

Their codec (field checks, encode, decode) is `cluster/wire/protocol.py`, which re-exports
them; import them from there. Nested items are checked by the same codec as the messages
that hold them, so a decoded message holds these types, never loose dicts. Other list and
dict fields hold plain values exactly as they travel (token ids as list[int]), except `KvBatch.tensors` and `KvLayers.tensors` (torch.Tensor; FramedTensor once decoded).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from cluster.sampling_params import SamplingParams
from cluster.wire.gauges import HistogramSample, WorkerGauges   # noqa: F401 (nested in Heartbeat)
from cluster.wire.kv_items import KvFailed, KvFailure, KvReq, KvSpan, Peer   # noqa: F401 (nested in the KV messages)


# nested items ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TokensItem:
    """One request's new tokens in a `tokens` message."""
    rid: str
    token_ids: list
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    logprobs: Optional[list] = None               # one per token when asked for
    top_logprobs: Optional[list] = None           # per token: [[token_id, logprob], ...] best first
    forward_iter: Optional[int] = None            # the batch that sampled them (request tracing)
    prompt_logprobs: Optional[list] = None        # the prompt's (tokens 1..), once, with the first token

    def __post_init__(self) -> None:
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")
        if self.top_logprobs is not None and len(self.top_logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.top_logprobs)} top_logprobs for {len(self.token_ids)} tokens")


# messages -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Register:                                   # worker -> router
    TYPE: ClassVar[str] = "register"
    worker_id: str
    role: str                                     # one of cluster.roles.ROLES
    model: str
    capacity: dict                                # num_pages, page_size, max_running_requests, tp
    kv_fingerprint: dict                          # num_layers, num_kv_heads, head_dim, dtype, page_size, layout (kv | latent:R+P)
    data_addr: str = ""                           # "" when the worker has no data plane
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:                                  # worker -> router
    TYPE: ClassVar[str] = "heartbeat"
    worker_id: str
    forward_ct: int
    gauges: WorkerGauges                          # its metrics, as gauges.py declares them


@dataclass(frozen=True, slots=True)
class Generate:                                   # router -> worker
    TYPE: ClassVar[str] = "generate"
    rid: str
    input_ids: list
    sampling: SamplingParams                      # the request's original parameters
    peer: Optional[Peer] = None                   # the other side of a (prefill, decode) pair
    model: str = ""
    dllm: dict = field(default_factory=dict)      # DllmParams overrides (dllm workers)
    output_ids: list = field(default_factory=list)  # tokens already generated (resume)
    # n > 1 (pairs): the wire rids of choices 1.. of this prompt. Prefill runs the prompt once;
    # decode forks them over its KV, choice j seeded `sampling.for_choice(j)`
    siblings: list = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Reprefill:                                  # decode -> prefill (data plane)
    TYPE: ClassVar[str] = "reprefill"
    rid: str                                      # a request decode retracted
    input_ids: list
    sampling: SamplingParams                      # the request's original parameters
    output_ids: list                              # tokens generated so far
    decode: Peer                                  # where its KV goes back to


@dataclass(frozen=True, slots=True)
class DecodeReady:                                # decode -> prefill (data plane)
    TYPE: ClassVar[str] = "decode_ready"
    rid: str
    decode: Peer                                  # the decode worker that reserved the pages
    held_len: int = 0                             # leading tokens whose KV decode keeps from its cache
    # > 0: the KV is for a DLLM worker, which makes the first tokens itself (prefill samples
    # none) and whose committed tokens attend both ways inside aligned blocks of this many
    # tokens (block-causal, SDAR); 1: causal. 0: an autoregressive decode worker
    dllm_attn_block: int = 0


@dataclass(frozen=True, slots=True)
class KvBatch:                                    # prefill -> decode (data plane)
    TYPE: ClassVar[str] = "kv_batch"
    forward_iter: int
    prefill_worker_id: str
    reqs: list                                    # KvReq
    tensors: list = field(compare=False)          # zmq: per req [layers, planes, seq_len - held_len, kv_heads,
                                                  # head_dim] (planes: K and V, or MLA's one latent plane;
                                                  # decoded as FramedTensor); other backends: []
    backend: str = "zmq"                          # the kv_transfer backend that moves the bytes
    source: dict = field(default_factory=dict)    # how to reach the prefill pool (shm, cuda_ipc, nccl)


@dataclass(frozen=True, slots=True)
class KvLayers:                                   # prefill -> decode (data plane), layer-wise
    """Layers [layer, layer + num_layers) of each request's KV, sent as soon as the prefill
    forward computed them, ahead of the requests' `kv_batch` (which names how many went ahead)."""
    TYPE: ClassVar[str] = "kv_layers"
    forward_iter: int
    prefill_worker_id: str
    layer: int
    num_layers: int
    reqs: list                                    # KvSpan
    tensors: list = field(compare=False)          # zmq: per req [num_layers, planes, seq_len - held_len,
                                                  # kv_heads, head_dim]; other backends: []
    backend: str = "zmq"
    source: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KvAck:                                      # decode -> prefill (data plane)
    TYPE: ClassVar[str] = "kv_ack"
    rids: list
    failed: list                                  # KvFailed
    decode_worker_id: str


@dataclass(frozen=True, slots=True)
class PlainTokens:
    """A steady decode step's output in two parallel lists: one new token per request and
    nothing else (no finish, error or logprobs). msgpack packs the lists in C, where a
    TokensItem per request costs a map each; the receiver reads them as TokensItems."""
    rids: list
    token_ids: list                               # token_ids[i] is the one new token of rids[i]
    forward_iter: Optional[int] = None            # the batch that sampled them

    def __post_init__(self) -> None:
        if len(self.rids) != len(self.token_ids):
            raise ValueError(f"{len(self.rids)} rids for {len(self.token_ids)} tokens")

    def items(self) -> list:
        it = self.forward_iter
        return [TokensItem(rid, [t], None, None, None, None, it, None) for rid, t in zip(self.rids, self.token_ids)]


@dataclass(frozen=True, slots=True)
class Tokens:                                     # decode / unified / dllm -> router
    TYPE: ClassVar[str] = "tokens"
    worker_id: str
    items: list                                   # TokensItem
    # more requests' tokens, emitted after every item above (they stay packed through the
    # codec: the router hands them on row by row without an item each)
    plain: Optional[PlainTokens] = None

    def all_items(self) -> list:
        """`items`, then `plain` as TokensItems."""
        return self.items + self.plain.items() if self.plain is not None else self.items


# the moments of a request a worker reports (cluster/router/request_trace.py orders them);
# `decode_done` only adds attributes (last forward_iter) to the final phase
WORKER_MARKS = ("prefill_launched", "prefill_done", "kv_received", "first_decode_launched",
                "first_decode_done", "decode_done")


@dataclass(frozen=True, slots=True)
class RequestMark:
    """One moment of a request on a worker."""
    name: str                                     # one of WORKER_MARKS
    t: float                                      # wall clock, unix seconds
    attrs: dict                                   # str -> str | int | float | bool


@dataclass(frozen=True, slots=True)
class MarksItem:
    """One request's new marks in a `request_marks` message."""
    rid: str
    marks: list                                   # RequestMark


@dataclass(frozen=True, slots=True)
class RequestMarks:                               # worker -> router
    TYPE: ClassVar[str] = "request_marks"
    worker_id: str
    items: list                                   # MarksItem


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
    retriable: bool = False                       # a timeout: another worker may succeed


@dataclass(frozen=True, slots=True)
class Shutdown:                                   # router -> worker: stop (end of a drain)
    TYPE: ClassVar[str] = "shutdown"
    reason: str


@dataclass(frozen=True, slots=True)
class RoleSwitch:                                 # router -> worker: drain, then register as `role`
    TYPE: ClassVar[str] = "role_switch"
    role: str


from cluster.wire.frontend_messages import (FrontendAbort, FrontendEnd, FrontendEvents, FrontendQuery,  # noqa: E402
                                            FrontendReply, FrontendReport, FrontendState, FrontendSubmit)

Message = Union[RequestMarks, Register, Heartbeat, Generate, Reprefill, DecodeReady, KvBatch, KvLayers, KvAck, Tokens,
                Abort, Error, Shutdown, RoleSwitch, FrontendSubmit, FrontendEvents, FrontendAbort, FrontendEnd,
                FrontendQuery, FrontendReply, FrontendReport, FrontendState]
