"""Req and ScheduleBatch: the two objects every scheduler passes around.

A ScheduleBatch is what one `run_batch` launches. Its `forward_iter` is the value of
the worker's `forward_ct` right after `run_batch` incremented it, so the batch keeps
the identity of the iteration that launched it even when (under overlap) it is
processed after later batches were launched. `copy()` keeps it, and so does the
`kv_batch` a prefill batch becomes on the wire.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from cluster.sampling_params import SamplingParams
from cluster.wire.messages import Peer


class ForwardMode(str, enum.Enum):
    EXTEND = "extend"      # prompt tokens (a whole prompt, a chunk, or past a cached prefix)
    DECODE = "decode"      # exactly one new token per request
    DLLM = "dllm"          # one block-diffusion round (prefill-like, bidirectional tail)


class Req:
    """One request as a worker sees it. The prompt is never modified."""

    __slots__ = (
        "rid", "input_ids", "output_ids", "sampling", "eos_token_ids", "page_table",
        "kv_len", "num_pending", "finish_reason", "error", "future_slot",
        "output_logprobs", "peer", "grammar", "prompt_logprobs", "kv_attempt", "cache_node", "num_shared_pages",
        "cached_len", "dllm_attn_block",
    )

    def __init__(self, rid: str, input_ids: list[int], sampling: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), output_ids: Optional[list[int]] = None):
        if not input_ids:
            raise ValueError(f"request {rid}: empty prompt")
        self.rid = rid
        self.input_ids = tuple(input_ids)
        self.output_ids: list[int] = list(output_ids or [])
        self.sampling = sampling
        self.eos_token_ids = eos_token_ids
        self.page_table: list[int] = []
        self.kv_len = 0            # tokens whose KV is written or being written by a launched forward
        self.num_pending = 0       # tokens launched for sampling whose result is not processed yet
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.future_slot = -1      # overlap: where the forward side stores this request's last sampled token
        self.output_logprobs: list[float] = []
        self.peer: Optional[Peer] = None   # disaggregation: the other side's worker id and address
        self.grammar: Any = None           # RequestGrammar under structured outputs (engine/grammar.py)
        self.prompt_logprobs: Optional[list[float]] = None   # echo: computed, not yet streamed
        self.kv_attempt = 0                # disaggregation: KV handoffs tried (a bad checksum prefills again)
        # prefix cache (CacheManager): the radix node this request references, how many pages
        # at the head of page_table are the tree's, and the prefix-cache hit of its last admission
        # (on decode: the leading tokens it holds, which the prefill side calls held_len)
        self.cache_node: Any = None
        self.num_shared_pages = 0
        self.cached_len = 0
        # a DLLM prompt (> 0): no first token is sampled here, and committed KV attends both ways
        # inside aligned blocks of this many tokens (1: causal), which the prefix cache keeps apart
        self.dllm_attn_block = 0

    # derived lengths are properties, never copies kept in sync
    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def num_output(self) -> int:
        return len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return list(self.input_ids) + self.output_ids

    def __repr__(self) -> str:
        return f"Req({self.rid!r}, prompt={self.prompt_len}, out={self.num_output}, kv={self.kv_len})"


class MixedStep(NamedTuple):
    """A decode step carrying a prefill chunk in the same forward: its first `num_decode_rows`
    requests decode one token each; the rest are prompt chunks sized by the step's cost model."""
    num_decode_rows: int
    chunk_budget: int           # prompt tokens the cost model allowed beside those rows


@dataclass
class ScheduleBatch:
    """The requests one forward runs over, plus the per-request token counts it launched."""

    reqs: list[Req]
    mode: ForwardMode
    extend_lens: list[int] = field(default_factory=list)   # new tokens per request in this forward
    prefix_lens: list[int] = field(default_factory=list)   # tokens already in KV before it
    # the forward reaches the end of the request's sequence, not a prompt chunk that stops
    # short: an AR request samples its next token from it, a DLLM round carries its block
    is_last_chunk: list[bool] = field(default_factory=list)
    forward_iter: Optional[int] = None                     # set by Scheduler.run_batch, never later
    cached_len: int = 0                                    # prefix-cache hits of its requests (their cached_len)
    rows: Any = None                                       # decode: its StepRows (runtime/running_batch.py)
    mix: Optional["MixedStep"] = None                      # decode-side prefill riding in a decode step

    def __post_init__(self) -> None:
        n = len(self.reqs)
        if not self.extend_lens:
            self.extend_lens = [1] * n if self.mode == ForwardMode.DECODE else [0] * n
        if not self.prefix_lens:
            self.prefix_lens = [0] * n
        if not self.is_last_chunk:
            self.is_last_chunk = [True] * n
        assert len(self.extend_lens) == len(self.prefix_lens) == len(self.is_last_chunk) == n

    @property
    def batch_size(self) -> int:
        return len(self.reqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens already in KV before this forward (prefix hits, earlier chunks and blocks)."""
        return sum(self.prefix_lens)

    def copy(self) -> "ScheduleBatch":
        """A shallow copy that keeps the launch snapshot (forward_iter and token counts)."""
        return ScheduleBatch(reqs=list(self.reqs), mode=self.mode, extend_lens=list(self.extend_lens),
                             prefix_lens=list(self.prefix_lens), is_last_chunk=list(self.is_last_chunk),
                             forward_iter=self.forward_iter, cached_len=self.cached_len, rows=self.rows,
                             mix=self.mix)

    @property
    def num_decode_rows(self) -> int:
        """Requests this forward decodes one token for (a mixed step's first entries)."""
        if self.mode == ForwardMode.DECODE:
            return len(self.reqs)
        return self.mix.num_decode_rows if self.mix is not None else 0

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt tokens this forward prefills (a mixed step's chunk; none in a decode step)."""
        return 0 if self.mode == ForwardMode.DECODE else self.num_tokens - self.num_decode_rows
