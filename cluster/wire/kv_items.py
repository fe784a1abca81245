"""The nested items of the KV handoff between prefill and decode: who the other side is
(`Peer`), which KV a `kv_batch` or `kv_layers` message moves (`KvReq`, `KvSpan`) and why decode
refused a request's KV (`KvFailure`, `KvFailed`). The messages that hold them are in
messages.py, which re-exports these; the codec (cluster/wire/protocol.py) checks them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, slots=True)
class Peer:
    """The other side of a disaggregated request: its worker id and data-plane address, and (a
    decode worker naming itself) its tensor-parallel size, which decides how its KV travels."""
    worker_id: str
    data_addr: str
    tp: int = 1


def _check_held(item) -> None:
    if not 0 <= item.held_len < item.seq_len:
        raise ValueError(f"held_len {item.held_len} not in [0, seq_len {item.seq_len})")


@dataclass(frozen=True, slots=True)
class KvReq:
    """One request of a `kv_batch`: its first token, the length of its KV, the KV attempt
    (a re-prefill after a failed transfer is the next attempt), the KV checksum when verified,
    and, for backends that read the prefill pool in place (shm, cuda_ipc), its source pages."""
    rid: str
    first_token: Optional[int]                    # None: a DLLM prompt (its worker makes the first tokens)
    seq_len: int                                  # positions the request's KV covers
    first_logprob: Optional[float] = None
    first_top: Optional[list] = None              # the first token's [[token_id, logprob], ...] (top_logprobs)
    prompt_logprobs: Optional[list] = None        # prompt tokens 1.. when asked (echo with logprobs)
    attempt: int = 0
    checksum: Optional[int] = None                # cluster/kv_transfer/checksum.py
    src_pages: Optional[list] = None
    held_len: int = 0                             # leading tokens decode already holds: the KV
                                                  # travelling is positions [held_len, seq_len)
    layers_sent: int = 0                          # leading layers that went ahead in kv_layers
                                                  # messages (layer-wise); this one moves the rest
    tp: int = 1                                   # the prefill worker's TP layout: its ranks and the
    heads_per_rank: int = 0                       # KV heads each holds (0: not stated, one whole pool)

    def __post_init__(self) -> None:
        _check_held(self)

    @property
    def transfer_len(self) -> int:
        """Positions whose KV travels: [held_len, seq_len)."""
        return self.seq_len - self.held_len


@dataclass(frozen=True, slots=True)
class KvSpan:
    """One request of a `kv_layers` message: which KV the layers belong to (the fields of its
    coming `KvReq` that do not wait for the forward to finish)."""
    rid: str
    seq_len: int
    attempt: int = 0
    src_pages: Optional[list] = None
    held_len: int = 0
    tp: int = 1                                   # as KvReq
    heads_per_rank: int = 0

    def __post_init__(self) -> None:
        _check_held(self)

    @property
    def transfer_len(self) -> int:
        return self.seq_len - self.held_len


class KvFailure(str, enum.Enum):
    """Why a request's KV was refused (`kv_ack`) or lost; the `reason` label of
    `kv_transfer_failures_total`. Only CHECKSUM is worth prefilling again."""
    CHECKSUM = "checksum"            # landed, but not what was sent
    SHAPE = "shape"                  # lengths, pages or pool shapes that do not fit the request
    LAYERS = "layers"                # layer-wise: layers missing or out of order
    LAYOUT = "layout"                # a KV layout this worker cannot map
    UNREACHABLE = "unreachable"      # the backend cannot reach the sender's memory
    BACKEND = "backend"              # a backend this worker does not take, or that failed
    TIMEOUT = "timeout"              # prefill side: no kv_ack in time
    NOT_EXPECTED = "not_expected"    # the request was aborted, timed out, or this is an older attempt

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class KvFailed:
    """One request of a `kv_ack` whose KV decode refused, and why."""
    rid: str
    reason: KvFailure                             # checked against KvFailure's values on decode
    detail: str = ""                              # what went wrong, for logs and the request's error

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", KvFailure(self.reason))   # the wire's text, typed

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"
