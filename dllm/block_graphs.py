"""Denoising steps of DLLM blocks replayed as CUDA graphs, captured at startup per (batch bucket, lead room).

One graph replays a whole step for a batch of blocks: the model over a fixed layout of
`lead + width` token slots per request, the lm_head on the block rows and `unmask_step` on the
bucket's static `BlockState`, so consecutive steps need nothing from the host. Request b's slots
are `lead` slots for the committed tokens re-run before its block (right-aligned; the rest are
padding), then `width` slots for its block (the tail past a shorter block is padding). Two lead
rooms are captured: `shift` for a block's later steps (the shifted model's last committed token,
else none) and `width + shift` for a block's first step, which re-runs the block before it (the KV
policy of round_manager.py). A step whose leads fit neither runs eagerly (a prompt's first block).

Attention is the Triton extend kernel (its grid depends on the layout only); each token sees keys
`[0, kv_limit)` of its request's pages, as in an eager round. Padding slots write their KV into a
scratch page and see only key 0; padding rows attend to the scratch page alone. Inputs land in one
static int64 buffer per graph through one host-to-device copy per round and layout.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from cluster.engine.attention_context import AttentionContext, flat_pages, kv_limits
from cluster.engine.cuda_graphs import _no_gc, batch_buckets
from cluster.engine.forward_batch import ForwardInput
from cluster.engine.kv_cache import pages_for
from dllm.unmask import BlockState, unmask_step

logger = logging.getLogger(__name__)

MAX_STOP_IDS = 16      # per request, in a graph's static state (more: the round runs eagerly)
MAX_BANNED = 4


@dataclass
class _Step:
    buffer: torch.Tensor         # int64: lead ids [B*R], positions, slots, kv limits [B*T] each, page starts [B], pages
    rows: int                    # B
    lead: int                    # R
    run: Callable[[], None]      # the step over the static buffer and state, as the graph captured it
    graph: Optional[torch.cuda.CUDAGraph] = None

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()


class BlockGraphs:
    """`capture=False`: the same static steps run eagerly, built on first use (tests on the CPU,
    through Triton's interpreter)."""

    def __init__(self, runner, shift: int, width: int, max_batch: int, mask_token_id: int, capture: bool = True):
        self.runner, self.model, self.kv_caches = runner, runner.model, runner.kv_caches
        self.device, self.page_size = runner.device, runner.page_size
        self.shift, self.width = shift, width
        self.vocab_size, self.mask_token_id = runner.config.vocab_size, mask_token_id
        self.buckets = batch_buckets(max_batch)
        self.leads = sorted({shift, width + shift})
        self.scratch_page = runner.page_allocator.allocate(1)[0]
        self.max_pages = 2 * runner.page_allocator.num_pages + max_batch + 1
        self.states = {b: BlockState.empty(b, width, MAX_STOP_IDS, MAX_BANNED, self.vocab_size, mask_token_id,
                                           self.device) for b in self.buckets}
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps: dict[tuple[int, int], _Step] = {}
        self.capture_s = 0.0

    # ---- shapes -------------------------------------------------------------------------
    def bucket(self, num_blocks: int) -> Optional[int]:
        i = bisect.bisect_left(self.buckets, num_blocks)
        return self.buckets[i] if i < len(self.buckets) else None

    def state_shape(self, num_blocks: int, width: int, num_stop_ids: int, num_banned: int) -> Optional[tuple]:
        """The static state shape a round's host state must be built in, or None (eager round)."""
        b = self.bucket(num_blocks)
        if b is None or width > self.width or num_stop_ids > MAX_STOP_IDS or num_banned > MAX_BANNED:
            return None
        return b, self.width, MAX_STOP_IDS, MAX_BANNED

    def _offsets(self, b: int, lead: int) -> tuple[int, ...]:
        t = lead + self.width
        ends = np.cumsum([b * lead, b * t, b * t, b * t, b, self.max_pages])
        return tuple(int(e) for e in ends)

    # ---- capture ------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_all(self) -> None:
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with _no_gc():
            for b in sorted(self.buckets, reverse=True):   # largest first: smaller ones reuse its pool
                for lead in self.leads:
                    self.steps[b, lead] = self._capture(self._build(b, lead))
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d DLLM block-step CUDA graphs (batch %d..%d, block %d) in %.2f s", len(self.steps),
                    self.buckets[0], self.buckets[-1], self.width, self.capture_s)

    def _build(self, b: int, lead: int) -> _Step:
        t, width, shift = lead + self.width, self.width, self.shift
        ends = self._offsets(b, lead)
        buffer = torch.zeros(ends[-1], dtype=torch.int64, device=self.device)
        ids_lead, positions, slots, limits, page_start, pages = (
            buffer[s:e] for s, e in zip((0,) + ends[:-1], ends))
        q_start = torch.arange(b, device=self.device) * t
        ext = torch.full((b,), t, dtype=torch.int64, device=self.device)
        state = self.states[b]

        def run() -> None:
            ids = torch.cat([ids_lead.view(b, lead), state.tokens], dim=1).view(-1)
            ctx = AttentionContext(b, t, positions, slots, None, None, None, None, False, backend="triton",
                                   pages=pages, page_start=page_start, q_start=q_start, extend_lens_t=ext,
                                   kv_limit=limits)
            hidden = self.model(ids, positions, self.kv_caches, ctx)
            rows = hidden.view(b, t, -1)[:, lead - shift:lead - shift + width].reshape(b * width, -1)
            unmask_step(state, self.model.compute_logits(rows).view(b, width, -1))

        return _Step(buffer, b, lead, run)

    def _capture(self, step: _Step) -> _Step:
        ends = self._offsets(step.rows, step.lead)
        # a harmless step for the warm-up and the capture: every slot a padding slot
        step.buffer[ends[1]:ends[2]] = self.scratch_page * self.page_size
        step.buffer[ends[2]:ends[3]] = 1
        step.buffer[ends[4]] = self.scratch_page
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):   # warm-up outside the graph (allocator, Triton compiles)
            step.run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self.pool):
            step.run()
        return step

    # ---- replay -------------------------------------------------------------------------
    def fill(self, b: int, fi: ForwardInput, block_lens: list[int], carry=None,
             carried: Optional[torch.Tensor] = None) -> Optional[_Step]:
        """Load `fi` (per request: committed tokens, then a block of `block_lens[i]`) into the
        narrowest captured layout it fits; None when none does. `carry` / `carried`: ids still on the
        device (a chained round, carry.py), written into their lead slots there."""
        leads = np.asarray(fi.extend_lens, dtype=np.int64) - np.asarray(block_lens, dtype=np.int64)
        lead = next((r for r in self.leads if leads.max() <= r), None)
        if lead is None or max(block_lens) > self.width or fi.num_reqs != len(block_lens):
            return None
        n, t, ps = fi.num_reqs, lead + self.width, self.page_size
        prefix = np.asarray(fi.prefix_lens, dtype=np.int64)
        ext = np.asarray(fi.extend_lens, dtype=np.int64)
        seq = prefix + ext
        counts = [pages_for(int(s), ps) for s in seq]
        flat = flat_pages(fi.page_tables, counts)
        m = flat.size
        if m + 1 > self.max_pages:
            return None
        starts = np.cumsum([0] + counts[:-1]).astype(np.int64)
        req = np.repeat(np.arange(n), ext)                           # each token's request
        k = np.arange(req.size) - np.repeat(np.cumsum(ext) - ext, ext)   # its index in the request's extend
        pos = prefix[req] + k
        at = req * t + lead - leads[req] + k                         # its slot in the layout
        limit = kv_limits(fi.extend_lens, fi.prefix_lens, seq.tolist(), fi.bidirectional_lens or [0] * n,
                          fi.attn_block_sizes or None).numpy()
        ends = self._offsets(b, lead)
        # pinned on CUDA: a pageable copy may wait for the stream (the step before this one); the host
        # allocator keeps the block until its copy is done
        host_t = torch.zeros(ends[4] + m + 1, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        host = host_t.numpy()
        ids_lead, positions, slots, limits, page_start = (host[s:e] for s, e in zip((0,) + ends[:4], ends[:5]))
        slots[:] = self.scratch_page * ps
        limits[:] = 1
        positions[at] = pos
        slots[at] = flat[starts[req] + pos // ps] * ps + pos % ps
        limits[at] = limit
        is_lead = k < leads[req]
        ids_lead[(req * lead + lead - leads[req] + k)[is_lead]] = fi.input_ids.numpy()[is_lead]
        page_start[:n] = starts
        page_start[n:] = m                                           # padding rows: the scratch page
        host[ends[4]:ends[4] + m] = flat
        host[ends[4] + m] = self.scratch_page
        step = self.steps.get((b, lead))
        if step is None:                                             # not captured: built now, run eagerly
            step = self.steps[b, lead] = self._build(b, lead)
        step.buffer[:host.size].copy_(host_t, non_blocking=True)
        if carry is not None:                                        # carried ids sit before their blocks
            lead_slot = np.full(req.size, -1, dtype=np.int64)
            lead_slot[is_lead] = (req * lead + lead - leads[req] + k)[is_lead]
            slots = torch.from_numpy(lead_slot[carry.token_at.numpy()])
            assert int(slots.min()) >= 0, "a carried id past its lead room"
            slots = slots.pin_memory() if self.device.type == "cuda" else slots
            step.buffer.index_copy_(0, slots.to(self.device, non_blocking=True), carried)
        return step


class GraphPlan:
    """How one block round replays: its bucket's static state, and per step the graph (filled on
    first use, after the steps before it were launched, since two may share a buffer)."""

    def __init__(self, graphs: BlockGraphs, r):
        self.graphs, self.round = graphs, r
        self.bucket = graphs.bucket(r.num_blocks)
        self.state = graphs.states[self.bucket]
        self.host_state = r.state
        self._entry: Optional[_Step] = None
        self._later: Optional[_Step] = None
        self._tried_later = False

    def replay(self, k: int, carried: Optional[torch.Tensor] = None) -> bool:
        """Replay step k (0: the round's forward) if a graph takes it; False: run it eagerly.
        `carried`: the step's ids still on the device (a chained round's, carry.py)."""
        r, g = self.round, self.graphs
        if k == 0:
            step = g.fill(self.bucket, r.entry, r.block_lens, r.entry_carry, carried) if r.entry_has_only_blocks else None
        else:
            if not self._tried_later:
                self._later = g.fill(self.bucket, r.steps, r.block_lens, r.steps_carry, carried)
                self._tried_later = True
            step = self._later
        if step is None:
            return False
        step.replay()
        return True


def plan_for(graphs: Optional[BlockGraphs], r) -> Optional[GraphPlan]:
    """A round replays through graphs when its host state was built in a bucket's static shape."""
    if graphs is None or r.state.shape[0] not in graphs.states:
        return None
    return GraphPlan(graphs, r) if r.state.shape == graphs.states[r.state.shape[0]].shape else None
