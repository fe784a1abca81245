"""BlockLoop: a DLLM round whose blocks are denoised to the end on the device, one host read per round.

The per-forward round (round_manager.py) brings each forward's logits to the host, where the
commit rule runs, so every denoising step waits for the device. A block round instead runs a
block's whole loop where the model is: the round's forward, then as many later steps as its
blocks need, each followed by `unmask_step` (unmask.py, the same rules as tensor ops) on the
blocks' device state; the tokens leave once, when every block of the round is done.

- The first step is the round's own `ForwardInput` (per request its uncached committed tokens,
  then its block); a later step's input is per request the committed tokens the KV policy keeps
  uncached (the shifted model's last token, SDAR's prompt tail in the first block), then the
  block, whose ids come from the device state. Both build exactly the ForwardInput the per-forward
  path would, so on the CPU a block round commits exactly what those rounds commit.
- With `fixed_steps` the number of steps is known when the round is launched: nothing is read
  until the end. With `low_confidence` it depends on the confidences: after each step one flag
  (any block still filling) is read, an 8-byte copy the next step waits for; a step launched
  blindly past the end would cost a whole forward.
- On CUDA the steps replay CUDA graphs (block_graphs.py) when the batch and its blocks fit a
  captured bucket, else run eagerly.
- A chained round (round_manager.py) takes the previous round's tokens from the device (carry.py):
  the loop keeps the last round's device tokens for it. With `defer_read` the round's read is only
  launched (pinned copies and an event): the forward thread returns at once and launches the next
  round behind it, and the scheduler waits for the tokens (`BlockResult.wait`) when it processes them.

Only greedy requests (temperature 0) take this path (seeded draws stay on the host, per forward).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from cluster.engine.cuda_graphs import cuda_graphs_enabled
from cluster.engine.forward_batch import READ_TIMEOUT_S, ForwardInput, wait_for_event
from cluster.runtime.schedule_batch import ForwardMode, ScheduleBatch
from dllm.block_graphs import BlockGraphs, plan_for
from dllm.carry import Carry, carry_of
from dllm.unmask import BlockState, unmask_step


@dataclass
class BlockRound:
    """A round launched as a block loop (built by `build_block_round`)."""
    entry: ForwardInput          # the round's forward
    steps: ForwardInput          # a later step: the block requests only, in state-row order
    state: BlockState            # host state of the block requests' blocks
    entry_rows: np.ndarray       # int64 [n, L]: row of the entry's kept logits predicting block position j
    step_rows: np.ndarray        # int64 [n, L]: same for a later step
    block_lens: list[int]        # per block request
    max_steps: int               # forwards the slowest block can still need
    read_each_step: bool         # a low_confidence block: stop as soon as every block is done
    forward_iter: int = 0        # the round's launching iteration (a chained round's carry names it)
    entry_carry: Optional[Carry] = None   # ids of the previous round still on the device (carry.py)
    steps_carry: Optional[Carry] = None

    @property
    def num_blocks(self) -> int:
        return len(self.block_lens)

    @property
    def entry_has_only_blocks(self) -> bool:
        return self.entry.num_reqs == self.num_blocks


@dataclass
class BlockResult:
    """Per block request (state rows): its block's tokens, logprobs, the step that committed each
    position (-1: never, past a stop) and its steps taken. A deferred read holds pinned copies still
    landing (`ready`): `wait()` before reading."""
    tokens: list[list[int]]
    logprobs: list[list[float]]
    commit_step: list[list[int]]
    num_steps: list[int]
    timings: dict = field(default_factory=dict)
    ready: Optional[torch.cuda.Event] = None
    pinned: Optional[list[torch.Tensor]] = None

    def wait(self, timeout: float = READ_TIMEOUT_S) -> "BlockResult":
        """The round's tokens, once its pinned copies have landed (TimeoutError past `timeout`: the
        device hangs, and the scheduler fails the round's requests instead of waiting forever)."""
        if self.ready is not None:
            wait_for_event(self.ready, timeout)
            self.tokens, self.logprobs, self.commit_step, self.num_steps = (t.tolist() for t in self.pinned)
            self.ready = self.pinned = None
        return self


def kept_rows(fi: ForwardInput, block_lens: list[int], has_block: list[bool], width: int) -> np.ndarray:
    """[n, width]: for each request with a block, the row of `fi`'s kept logits (`logits_lens`
    rows per request) that predicts block position j (0 past its block)."""
    offsets = (np.cumsum(fi.logits_lens) - fi.logits_lens)[np.asarray(has_block, dtype=bool)]
    j = np.arange(width)[None, :]
    return np.where(j < np.asarray(block_lens)[:, None], offsets[:, None] + j, 0).astype(np.int64)


def build_block_round(rounds, batch: ScheduleBatch, entry: ForwardInput, vocab_size: int,
                      graphs: Optional[BlockGraphs] = None, pin_memory: bool = False) -> BlockRound:
    """The block round of `batch` (launched by `rounds.schedule`, whose forward is `entry`); its
    host state in the static shape of a graph bucket where one takes it (pinned for a CUDA device)."""
    spec = rounds.spec
    has_block = [bool(n) for n in entry.logits_lens]
    reqs = [r for r, h in zip(batch.reqs, has_block) if h]
    states = [rounds.running[r.rid] for r in reqs]
    blocks = [s.newest_block for s in states]     # a chained request's block starts past seq_len
    lens = [len(b) for b in blocks]
    # a later step: from the KV the launch made final to the end of the block
    step_batch = ScheduleBatch(reqs, ForwardMode.DLLM, extend_lens=[b.start - r.kv_len + n for r, b, n in zip(reqs, blocks, lens)],
                               prefix_lens=[r.kv_len for r in reqs])
    steps = rounds.forward_input(step_batch)
    banned = frozenset([spec.mask_token_id]) if spec.bans_mask else frozenset()
    stop_ids = [s.stop_ids for s in states]
    shape = graphs.state_shape(len(reqs), max(lens), max(map(len, stop_ids)), len(banned)) if graphs else None
    rows, width, k, kb = shape or (0, 0, 0, 0)
    state = BlockState.build(blocks, [s.params for s in states], stop_ids,
                             [max(0, r.sampling.min_tokens - 1 - (b.start - r.prompt_len)) for r, b in zip(reqs, blocks)],
                             banned,
                             vocab_size, spec.mask_token_id, rows, width, k, kb, pin_memory)
    width = state.width
    left = [len(b.masked) if b.plan is None else max(1, len(b.plan) - b.num_steps) for b in blocks]
    return BlockRound(entry, steps, state, kept_rows(entry, lens, has_block, width),
                      kept_rows(steps, lens, [True] * len(reqs), width), lens, max(1, max(left, default=1)),
                      any(b.plan is None for b in blocks), batch.forward_iter or 0,
                      carry_of(rounds, batch, batch.extend_lens, batch.prefix_lens, pin_memory),
                      carry_of(rounds, step_batch, step_batch.extend_lens, step_batch.prefix_lens, pin_memory))


def block_loop_for(runner, spec, width: int, max_batch: int) -> "BlockLoop":
    """The loop of a DLLM worker; on CUDA (unless `PDCLUSTER_CUDA_GRAPHS=0`) with its block-step
    graphs captured now, for blocks of `width` and batches up to `max_batch`."""
    graphs = None
    if cuda_graphs_enabled(runner.device) and runner.attention_backend == "triton" and runner.config.mla is None:
        graphs = BlockGraphs(runner, spec.shift, width, max_batch, spec.mask_token_id, capture=runner.device.type == "cuda")
        if graphs.capture:
            graphs.capture_all()
    return BlockLoop(runner, graphs)


class BlockLoop:
    """Runs block rounds (and passes any other input to the runner's forward)."""

    def __init__(self, runner, graphs=None):
        self.runner = runner
        self.device = runner.device
        self.graphs = graphs            # block_graphs.BlockGraphs on CUDA, or None (eager)
        self.num_graph_steps = self.num_eager_steps = 0
        self.num_host_reads = 0         # waits for the device: one per round, plus a flag per low_confidence step
        self.run_s = 0.0                # wall time inside `run`, from the inputs' copy to the tokens' read (launched)
        self.defer_read = False         # return before the tokens land (BlockResult.wait); CUDA only
        self.last: Optional[tuple[int, torch.Tensor]] = None   # (forward_iter, device tokens) of the last round
        # CUDA: (start, end) events of each round on the device, when set to a list (benchmarks)
        self.device_spans: Optional[list] = None

    def forward(self, forward_input):
        if isinstance(forward_input, BlockRound):
            return self.run(forward_input)
        return self.runner.forward(forward_input)

    @torch.inference_mode()
    def run(self, r: BlockRound) -> BlockResult:
        t0 = time.perf_counter()
        span = self._span_start()
        if self.runner.import_fence is not None:
            self.runner.import_fence.wait()   # NOTE: a prompt's KV prefilled remotely has landed (as in forward)
        # NOTE: before anything of this round is loaded: it may reuse the last round's static state
        entry_ids, step_ids = self._carried(r.entry_carry), self._carried(r.steps_carry)
        n = r.num_blocks
        plan = plan_for(self.graphs, r)
        if plan is not None:
            state = plan.state
            state.load(plan.host_state)
        else:
            state = r.state.to(self.device, non_blocking=True)
        eager_steps = None
        flag = torch.zeros(1, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        for k in range(r.max_steps):
            if k and r.read_each_step and not self._any_active(state, flag):
                break
            if plan is not None and plan.replay(k, entry_ids if k == 0 else step_ids):
                self.num_graph_steps += 1
                continue
            if k == 0:
                ids = _patched(r.entry.input_ids, r.entry_carry, entry_ids, self.device) if r.entry_carry else None
                logits = self._logits(r.entry, r.entry_rows, self.runner.run_model(r.entry, ids))
            else:
                eager_steps = eager_steps or _EagerSteps(r, self.device, step_ids)
                logits = self._logits(r.steps, r.step_rows, self.runner.run_model(r.steps, eager_steps.ids(state)))
            unmask_step(state.rows(n), logits)
            self.num_eager_steps += 1
        self.last = (r.forward_iter, state.tokens)
        out = self._read(state, n)
        self._span_end(span)
        out.timings = {"total_s": time.perf_counter() - t0}
        self.run_s += out.timings["total_s"]
        return out

    def _carried(self, carry: Optional[Carry]) -> Optional[torch.Tensor]:
        """A chained round's ids from the device tokens of the round it follows."""
        if carry is None:
            return None
        if self.last is None or self.last[0] != carry.source_iter:
            raise RuntimeError(f"round chained from [{carry.source_iter}], but the last block round was "
                               f"[{self.last[0] if self.last else None}]")
        return carry.gather(self.last[1])

    def _span_start(self):
        if self.device_spans is None or self.device.type != "cuda":
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def _span_end(self, start) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.device_spans.append((start, end))

    def device_s(self) -> float:
        """Seconds the recorded rounds spanned on the device (waits for them); clears the spans."""
        spans, self.device_spans = self.device_spans or [], []
        if spans:
            spans[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in spans) / 1e3

    def _logits(self, fi: ForwardInput, rows: np.ndarray, hidden: torch.Tensor) -> torch.Tensor:
        """[n, L, V] float32: as the per-forward path projects its kept rows, then the block rows."""
        keep = fi.logits_rows()
        model = self.runner.model
        logits = model.compute_logits(hidden if keep is None else hidden[keep.to(self.device, non_blocking=True)])
        index = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return logits.index_select(0, index.view(-1)).view(*rows.shape, -1)

    def _any_active(self, state: BlockState, flag: torch.Tensor) -> bool:
        """The one read a low_confidence step needs (pinned, so it waits for that flag alone)."""
        self.num_host_reads += 1
        if self.device.type != "cuda":
            return bool(state.num_active[0])
        flag.copy_(state.num_active, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return bool(flag[0])

    def _read(self, state: BlockState, n: int) -> BlockResult:
        """The round's only full read: the blocks' rows, through pinned memory on CUDA."""
        self.num_host_reads += 1
        rows = state.rows(n)
        out = [rows.tokens, rows.logprobs, rows.commit_step, rows.num_steps]
        if self.device.type == "cuda":
            out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in out]
            ready = torch.cuda.Event()
            ready.record()
            if self.defer_read:
                return BlockResult([], [], [], [], ready=ready, pinned=out)
            ready.synchronize()
        return BlockResult(*(t.tolist() for t in out))


class _EagerSteps:
    """Input ids of an eager later step: the round's step ids with the blocks' tokens taken from the
    device state (index built once per round, on the host)."""

    def __init__(self, r: BlockRound, device, carried: Optional[torch.Tensor] = None):
        fi = r.steps
        ends = np.cumsum(fi.extend_lens)
        width = r.state.width
        token_at = np.concatenate([ends[i] - n + np.arange(n) for i, n in enumerate(r.block_lens)])
        state_at = np.concatenate([i * width + np.arange(n) for i, n in enumerate(r.block_lens)])
        self.base = _patched(fi.input_ids, r.steps_carry, carried, device)
        self.token_at = torch.from_numpy(token_at).to(device, non_blocking=True)
        self.state_at = torch.from_numpy(state_at).to(device, non_blocking=True)

    def ids(self, state: BlockState) -> torch.Tensor:
        return self.base.index_copy(0, self.token_at, state.tokens.reshape(-1).index_select(0, self.state_at))


def _patched(input_ids: torch.Tensor, carry: Optional[Carry], carried: Optional[torch.Tensor], device):
    """`input_ids` on the device, with a chained round's carried ids in place."""
    ids = input_ids.to(device, non_blocking=True)
    if carry is None:
        return ids
    return ids.index_copy(0, carry.token_at.to(device, non_blocking=True), carried)
