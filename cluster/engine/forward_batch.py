"""The contract between a scheduler and the engine: one forward in, one result out.

A scheduler builds a `ForwardInput` on its own thread when it launches a batch; the
engine's `ModelRunner.forward(ForwardInput) -> ForwardOutput` runs it (on the forward
thread under overlap). Everything here is plain CPU tensors / lists so that building it
never waits for the device.

Per request i, the forward covers the token positions
`prefix_lens[i] .. prefix_lens[i] + extend_lens[i] - 1`; its KV is written into the pages
`page_tables[i]` (page p holds positions p*page_size .. (p+1)*page_size-1 of that
request, in page-table order). Tokens attend causally to everything before them,
except that the last `bidirectional_lens[i]` tokens of the request's extend segment
also attend to each other in both directions (DLLM blocks; 0 = plain causal).

With `return_logits`, `logits_lens[i]` keeps only request i's last `logits_lens[i]` extend
rows (0 = none): the engine projects just those hidden rows to the vocabulary and returns
them concatenated in request order, `[sum(logits_lens), vocab]`. Empty = every extend row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cluster.sampling_params import SamplingParams

READ_TIMEOUT_S = 600.0   # a deferred read that takes longer is a hung device, not a slow batch


@dataclass
class ForwardInput:
    input_ids: torch.Tensor                 # int64 [num_tokens]; value -(k+1) = future token of slot k
    extend_lens: list[int]                  # new tokens per request (1 for decode)
    prefix_lens: list[int]                  # tokens already in the KV cache per request
    page_tables: list[list[int]]            # pages per request, enough for prefix + extend ([] with block_table)
    sample: list[bool]                      # sample a next token from the request's last position
    sampling: list[SamplingParams]
    generators: list[Optional[torch.Generator]] = field(default_factory=list)
    prior_ids: list[list[int]] = field(default_factory=list)   # ids seen so far, for penalties
    min_tokens_left: list[int] = field(default_factory=list)   # >0 masks EOS for the request
    eos_token_ids: list[frozenset] = field(default_factory=list)
    future_slots: list[int] = field(default_factory=list)      # slot that stores the sampled token, -1 = none
    grammars: list = field(default_factory=list)   # RequestGrammar or None; advanced by the forward (grammar.py)
    prompt_targets: list = field(default_factory=list)   # per request: ids its extend rows predict (prompt logprobs), [] = none
    bidirectional_lens: list[int] = field(default_factory=list)  # DLLM: trailing tokens attending both ways
    attn_block_sizes: list[int] = field(default_factory=list)  # SDAR: a token also sees its aligned block
    return_logits: bool = False             # DLLM: return logits of extend tokens (see logits_lens)
    logits_lens: list[int] = field(default_factory=list)  # with return_logits: last rows kept per request, [] = all
    is_decode: bool = False                 # every extend_len is 1 (lets the engine take a batched path)
    # decode from the scheduler's persistent batch: int64 [B, P] pages per request, padded with 0 and at
    # least enough for prefix + 1 tokens; given instead of page_tables
    block_table: Optional[torch.Tensor] = None
    all_greedy: bool = False                # every request's token is the argmax of its raw logits (set when known)

    @property
    def num_reqs(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(p, p + e) for p, e in zip(self.prefix_lens, self.extend_lens)])

    def logits_rows(self) -> Optional[torch.Tensor]:
        """Indices into the extend tokens whose logits are returned; None = all of them."""
        if not self.logits_lens or self.logits_lens == self.extend_lens:
            return None
        assert len(self.logits_lens) == self.num_reqs, (self.logits_lens, self.extend_lens)
        assert all(0 <= k <= e for k, e in zip(self.logits_lens, self.extend_lens)), (self.logits_lens, self.extend_lens)
        ends = torch.tensor(self.extend_lens).cumsum(0).tolist()
        return torch.cat([torch.arange(end - k, end) for end, k in zip(ends, self.logits_lens)])


@dataclass
class ForwardOutput:
    next_token_ids: torch.Tensor            # int64 [num_reqs] on CPU; -1 where sample[i] is False
    logprobs: Optional[torch.Tensor] = None # float32 [num_reqs]: logprob of each chosen token
    logits: Optional[torch.Tensor] = None   # float32 [sum(logits_lens) or num_tokens, vocab] when return_logits
    top_ids: Optional[torch.Tensor] = None  # int64 [num_reqs, k]: the k most likely tokens (k = max top_logprobs)
    top_logprobs: Optional[torch.Tensor] = None   # float32 [num_reqs, k], sorted descending
    prompt_logprobs: Optional[list] = None  # per request: raw logprobs of its prompt_targets, or None
    # model_s / total_s: the host's time in the forward (deferred: up to its launch); step_s: see `wait`
    timings: dict[str, Any] = field(default_factory=dict)
    ready: Any = None                       # CUDA event: the host tensors are still being copied until it fires
    started: Any = None                     # CUDA timing event where the forward began on its stream (deferred)

    def wait(self, timeout: float = READ_TIMEOUT_S) -> "ForwardOutput":
        """Block until the host copies have landed (`forward(..., wait=False)` returns before). A deferred
        forward's `step_s` is its span on the device, from `started` to `ready`: the forward thread
        returned at launch, so its own clock says nothing of the forward's cost (step costs)."""
        if self.ready is not None:
            wait_for_event(self.ready, timeout)
            if self.started is not None:
                self.timings["step_s"] = self.started.elapsed_time(self.ready) / 1e3
            self.ready = self.started = None
        return self


def wait_for_event(event, timeout: float) -> None:
    """Until `event` has fired, polling with the GIL let go between polls (the forward thread is
    launching meanwhile); TimeoutError past `timeout` seconds: the device hangs."""
    deadline = time.monotonic() + timeout
    while not event.query():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the device did not finish a forward in {timeout:g} s")
        time.sleep(0)
