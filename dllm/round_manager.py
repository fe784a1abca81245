"""RoundManager: the DLLM worker's waiting queue and running set, and the rounds it launches.

A round is one forward over, per request, its uncached committed tokens followed by its
active block (masked positions carry the mask token / placeholder). The prefix comes from
the paged KV cache.

KV policy: only final KV is kept. `req.kv_len` advances (at launch) over committed tokens
only, up to `final_kv`: the block's own positions are written by every round but never
counted, so the next round overwrites them; once a block completes, its tokens are
uncached committed tokens and the next round's forward re-runs them with their final values
(together with the new block: no extra forward per block). A shifted model keeps its last
committed token uncached, since its logits predict the block's first position; aligned
blocks (SDAR) keep the prompt's tail uncached, since it sits in the bidirectional block;
through the engine's `attn_block_sizes` every committed aligned block also attends both ways
inside itself (SDAR-exact), and prompt chunks end on block boundaries.

Pages for prompt + max_tokens are reserved when a request is admitted, so a running request
never waits for memory and the pool cannot deadlock. Admission first takes the longest
prefix the prefix cache holds (whole blocks of block-causal KV, see cache_manager.py).

Remote prefill: a request with a prefill peer is admitted like any other, then waits
(`awaits_kv`) until its prompt's KV landed; `kv_landed` then opens its first block and
counts as cached exactly the KV a local first round would have kept (`final_kv`): the
positions past it (a shifted model's last prompt token, an aligned block's prompt tail)
are computed again by that round, as locally.

Overlap policy: a request is in at most one in-flight round (its next round depends on
which positions this one commits; `num_pending` marks it), except in a chained round (below).
What the other requests do while a round is in flight is `split`:

- merge (split False): nothing launches; ready requests and newcomers join the next round
  once the in-flight one is processed. One forward per step for everybody.
- alternate (split True): the ready requests launch at once, so two groups alternate and
  group A's forward runs while group B's result is processed; with nothing in flight and two
  or more ready requests, a round takes half of them to start the two groups.

Alternating hides the result processing (P) but pays one more forward per step: with
forward time a + b * tokens it wins only when P > a. On CPU the forward is bound by reading
the weights (a ~ 150 ms for SmolLM2-135M) while P is 1-5 ms, and alternating measured 0.6x
the merged throughput, so the scheduler picks `split` from measured times
(`DllmScheduler.split_groups`). SGLang instead runs a whole block's denoising loop inside one
`run_batch`; per-forward rounds keep each forward a scheduler iteration with its own `[N]`
line and let requests join and leave at every forward. On CUDA, where a host read per forward
would stall the device, greedy rounds are block rounds that do as SGLang does (block_loop.py).

Chained rounds (`schedule(chain_from=N)`): a block round fills its blocks to the end, so what
the next round of its requests looks like is known at its launch, all but the block's tokens.
Round N+1 is then launched while N is in flight: each request of N that its block leaves
tokens for gets its next block (`next_block`, from `block.start + len(block)`), and the
block's tokens reach N+1's input on the device (carry.py). So the host's work on N's result
overlaps N+1 on the device, at batch 1 too. A request that finishes in N (a stop id, a stop
string) is released then; N+1's tokens for it are discarded, and only KV final before N+1
(`done_kv_len`) goes to the prefix cache.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.prefill_manager import block_chunk
from cluster.engine.forward_batch import ForwardInput
from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch
from dllm.block import ActiveBlock
from dllm.model_spec import DllmModelSpec
from cluster.dllm_params import DllmParams



@dataclass
class DllmReq:
    """A request's DLLM state beside its `Req`."""
    req: Req
    params: DllmParams
    block: Optional[ActiveBlock] = None
    stop_ids: frozenset = field(default_factory=frozenset)   # EOS (unless ignore_eos) and stop ids
    generator: Optional[torch.Generator] = None              # seeded draws of the active block
    awaits_kv: bool = False                                  # remote prefill: pages reserved, KV not landed
    # chained rounds: the block of a round launched before `block`'s round was processed; the
    # (forward_iter, state row) of the block round filling the newest block on the device; the KV
    # final before the chained round
    next_block: Optional[ActiveBlock] = None
    round_row: Optional[tuple[int, int]] = None
    done_kv_len: int = 0

    @property
    def newest_block(self) -> Optional[ActiveBlock]:
        """The block the request's latest launched round carries."""
        return self.next_block if self.next_block is not None else self.block


class RoundManager:
    def __init__(self, cache: CacheManager, spec: DllmModelSpec, max_running_requests: int,
                 max_round_tokens: int, on_fail: Callable[[Req, str], None],
                 on_admit: Callable[[DllmReq], None] = lambda state: None):
        """`on_admit(state)`: a request just got its pages (remote prefill: now ask for the KV)."""
        self.cache = cache
        self.spec = spec
        self.max_running_requests = max_running_requests
        self.max_round_tokens = max_round_tokens
        self.on_fail = on_fail
        self.on_admit = on_admit
        self.waiting: deque[DllmReq] = deque()
        self.running: dict[str, DllmReq] = {}

    # ---- queues ----------------------------------------------------------------
    def add(self, state: DllmReq) -> None:
        sp = state.req.sampling
        state.stop_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else state.req.eos_token_ids)
        state.req.dllm_attn_block = self.attn_block(state)
        self.waiting.append(state)

    def attn_block(self, state: DllmReq) -> int:
        """The visibility of this request's final KV: aligned blocks attend both ways (SDAR),
        otherwise it is causal (1)."""
        return state.params.block_size if self.spec.aligned_blocks else 1

    def remove(self, rid: str) -> None:
        self.running.pop(rid, None)
        for s in self.waiting:
            if s.req.rid == rid:
                self.waiting.remove(s)
                break

    def get(self, rid: str) -> Optional[DllmReq]:
        return self.running.get(rid)

    def pages_needed(self, req: Req) -> int:
        return self.cache.pages_for(req.prompt_len + req.sampling.max_tokens)

    def admit(self) -> None:
        """Waiting -> running while slots and pages for the whole sequence are free."""
        while self.waiting and len(self.running) < self.max_running_requests:
            state = self.waiting[0]
            need = self.pages_needed(state.req)
            if need > self.cache.num_pages:
                self.on_fail(state.req, f"prompt + max_tokens needs {need} pages; the pool has {self.cache.num_pages}")
                continue   # on_fail removed it from the queue
            self.cache.match_prefix(state.req)
            if not self.cache.can_grow(state.req, need * self.cache.page_size):
                self.cache.unmatch(state.req)
                break
            self.cache.grow(state.req, need * self.cache.page_size)
            self.waiting.popleft()
            self.running[state.req.rid] = state
            self.on_admit(state)

    def kv_landed(self, state: DllmReq) -> None:
        """Its prompt's KV (all `seq_len` positions) came from a prefill worker: keep what a
        local first round would keep, and let it run."""
        state.awaits_kv = False
        state.block = self.new_block(state)
        state.req.kv_len = self.final_kv(state)

    # ---- rounds ----------------------------------------------------------------
    def new_block(self, state: DllmReq, ahead: int = 0) -> ActiveBlock:
        """The request's next block; `ahead`: tokens of an in-flight block not yet appended."""
        req, size = state.req, state.params.block_size
        seq_len, left = req.seq_len + ahead, req.sampling.max_tokens - req.num_output - ahead
        attn_start = seq_len - seq_len % size if self.spec.aligned_blocks else seq_len
        return ActiveBlock(seq_len, min(attn_start + size - seq_len, left), state.params, attn_start)

    def final_kv(self, state: DllmReq, block: Optional[ActiveBlock] = None) -> int:
        """Positions whose KV is final once the coming round (carrying `block`) is launched."""
        block = block or state.block
        return min(block.start - self.spec.shift, block.attn_start)

    def can_chain(self, state: DllmReq, chain_from: Optional[int]) -> bool:
        """In flight in block round `chain_from` alone, with tokens left past its block."""
        req, block = state.req, state.block
        return (chain_from is not None and req.num_pending == 1 and state.next_block is None and block is not None
                and state.round_row is not None and state.round_row[0] == chain_from
                and req.sampling.max_tokens - req.num_output - len(block) > 0)

    def schedule(self, split: bool = False, chain_from: Optional[int] = None) -> Optional[ScheduleBatch]:
        """The next round, or None. `split`: alternate two groups; `chain_from`: the last launched
        round was block round `chain_from`, whose requests may chain (see the module doc)."""
        self.admit()
        ready = [s for s in self.running.values() if not s.req.num_pending and not s.awaits_kv]
        num_inflight = sum(1 for s in self.running.values() if s.req.num_pending)
        chained = [s for s in self.running.values() if self.can_chain(s, chain_from)]
        if any(s.req.sampling.temperature > 0 for s in ready):
            chained = []        # a chained round is a block round, which takes greedy requests only
        if not ready and not chained or num_inflight and not split and not chained:
            return None
        if split and not chained and not num_inflight and len(ready) >= 2:
            ready = ready[: (len(ready) + 1) // 2]   # start two alternating groups
        budget = self.max_round_tokens
        reqs, extend_lens, prefix_lens, with_block = [], [], [], []
        for state in ready:
            req = state.req
            if state.block is None:
                state.block = self.new_block(state)
            final_kv = self.final_kv(state)
            need = req.seq_len - req.kv_len + len(state.block)
            if need <= budget or not reqs and final_kv <= req.kv_len:
                extend, full = need, True
            elif final_kv > req.kv_len and budget > 0:
                extend, full = self.chunk_len(state, min(budget, final_kv - req.kv_len)), False   # prompt only
            else:
                break
            reqs.append(req)
            prefix_lens.append(req.kv_len)
            extend_lens.append(extend)
            with_block.append(full)
            req.kv_len = final_kv if full else req.kv_len + extend
            req.num_pending = 1
            budget -= extend
        for state in chained:
            req = state.req
            block = self.new_block(state, ahead=len(state.block))
            need = block.start - req.kv_len + len(block)
            if need > budget:
                continue        # waits for its round to be processed, then goes as a ready one
            state.next_block, state.done_kv_len = block, req.kv_len
            reqs.append(req)
            prefix_lens.append(req.kv_len)
            extend_lens.append(need)
            with_block.append(True)
            req.kv_len = self.final_kv(state, block)
            req.num_pending += 1
            budget -= need
        if not reqs:
            return None
        # `is_last_chunk[i]`: the round carries request i's block (it commits tokens); False = prompt chunk
        return ScheduleBatch(reqs, ForwardMode.DLLM, extend_lens=extend_lens, prefix_lens=prefix_lens,
                             is_last_chunk=with_block)

    def chunk_len(self, state: DllmReq, n: int) -> int:
        """A prompt chunk ends on a block boundary when blocks are aligned (a block split
        across forwards could not attend both ways); `n` is at most the final KV left."""
        if not self.spec.aligned_blocks:
            return n
        return block_chunk(state.req.kv_len, n, state.params.block_size, n)

    def forward_input(self, batch: ScheduleBatch) -> ForwardInput:
        ids: list[int] = []
        bidirectional_lens = []
        for req, prefix, extend, full in zip(batch.reqs, batch.prefix_lens, batch.extend_lens, batch.is_last_chunk):
            if not full:
                ids += req.all_ids[prefix:prefix + extend]
                bidirectional_lens.append(0)
                continue
            block = self.running[req.rid].newest_block
            # positions past seq_len: a chained request's in-flight block, filled in on the device (carry.py)
            known = req.all_ids[prefix:block.start]
            ids += known + [self.spec.mask_token_id] * (block.start - prefix - len(known))
            ids += block.input_ids(self.spec.mask_token_id)
            bidi = prefix + extend - block.attn_start if self.spec.block_attention else 0
            bidirectional_lens.append(bidi)
        n = batch.batch_size
        fi = ForwardInput(
            input_ids=torch.tensor(ids, dtype=torch.int64), extend_lens=list(batch.extend_lens),
            prefix_lens=list(batch.prefix_lens), page_tables=[list(r.page_table) for r in batch.reqs],
            sample=[False] * n, sampling=[r.sampling for r in batch.reqs],
            bidirectional_lens=bidirectional_lens, return_logits=True,
            logits_lens=[len(self.running[r.rid].newest_block) + self.spec.shift if full else 0
                         for r, full in zip(batch.reqs, batch.is_last_chunk)])
        if self.spec.aligned_blocks:
            fi.attn_block_sizes = [self.running[r.rid].params.block_size for r in batch.reqs]
        return fi

    def logits_lens(self, batch: ScheduleBatch) -> list[int]:
        """Per request, the round's last rows whose logits it uses: the block's, plus the `shift`
        rows before it (row j predicts position j + shift); 0 for a prompt chunk.

        NOTE: the block length comes from the batch and `req.seq_len` (a round's input is
        `all_ids[prefix:]` then the block), not from the block itself, so it still holds for a
        request aborted while the round was in flight; `seq_len` cannot change before the
        round's result is processed."""
        return [prefix + extend - req.seq_len + self.spec.shift if full else 0
                for req, prefix, extend, full in zip(batch.reqs, batch.prefix_lens, batch.extend_lens, batch.is_last_chunk)]

    def block_logits(self, batch: ScheduleBatch, logits: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """Per request: the rows whose row j predicts block position j (None for a prompt chunk).
        `logits` holds `logits_lens(batch)` rows per request (the round's `ForwardInput`)."""
        out, offset = [], 0
        for req, num_rows in zip(batch.reqs, self.logits_lens(batch)):
            state = self.running.get(req.rid)
            if num_rows and state is not None and state.block is not None:
                out.append(logits[offset:offset + num_rows - self.spec.shift])
            else:
                out.append(None)
            offset += num_rows
        return out

    def __len__(self) -> int:
        return len(self.running)
