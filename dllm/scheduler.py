"""DllmScheduler: diffusion-LLM requests end to end, one block-diffusion round per forward.

Each request's answer grows block by block (see `round_manager.py` for rounds, the KV policy
and the overlap policy; `block.py` / `algorithms.py` for the commit rules). The loops are the
base Scheduler's; this class supplies the four role steps and `process_batch_result_dllm`.

Remote prefill (`[[dllm]] prefill = "remote" | "auto"`): the router pairs a request with a
prefill worker, and this worker plays the decode side of the handoff through the decode
worker's `KvReception`: once the request's pages are reserved it sends `decode_ready` naming
the KV visibility it needs (`dllm_attn_block`), lands the prompt's KV, and then denoises its
blocks. The prefill worker samples no first token: the first block is made here, as locally.

Chained rounds (`chain_rounds`, round_manager.py): under overlap with the block loop, the next
block round of a request is launched from its tokens still on the device, so processing round N
overlaps round N+1 even at batch 1; the block loop's reads are then deferred (block_loop.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Optional

from cluster.engine.sampler import token_generator
from cluster.wire.gauges import WorkerGauges
from cluster.engine.stop_checker import check_finish
from cluster.runtime.stats import PrefillStats
from cluster.runtime.schedule_batch import Req, ScheduleBatch
from cluster.runtime.worker_scheduler import WorkerScheduler
from dllm.model_spec import DllmModelSpec
from cluster.dllm_params import DllmParams
from cluster.wire import protocol as P
from decode_worker.kv_reception import KvReception
from dllm.block_loop import BlockResult, block_loop_for, build_block_round
from dllm.round_manager import DllmReq, RoundManager
from dllm.unmask import apply_to_block

SPLIT_WHEN_PROCESS_OVER = 0.5   # of a forward's time (see round_manager's overlap policy)
CHAIN_ENV = "PDCLUSTER_DLLM_CHAIN"   # 0 = no chained rounds (each block round waits for the last one's result)


class DllmScheduler(WorkerScheduler):
    role = "dllm"

    supports_prefix_cache = True

    def enable_prefix_cache(self, host_tier_gb: float = 0) -> None:
        """The device prefix cache only: the host tier wraps the forward for a ForwardInput,
        which a block round (block_loop.py) is not."""
        super().enable_prefix_cache(0)

    def __init__(self, config, worker_id, runner, control, spec: Optional[DllmModelSpec] = None,
                 params: Optional[DllmParams] = None, split_groups: Optional[bool] = None,
                 handoff=None, timeouts=None, block_loop: Optional[bool] = None,
                 chain_rounds: Optional[bool] = None):
        """`handoff` (a KvHandoff) and `timeouts`: this worker takes prompts prefilled remotely.
        `block_loop`: run greedy rounds' blocks to the end on the device (block_loop.py); default
        on CUDA (with CUDA graphs unless `PDCLUSTER_CUDA_GRAPHS=0`), off on the CPU.
        `chain_rounds`: launch a block round's next round before processing it (needs the block
        loop and overlap; default: whenever both are on, unless `PDCLUSTER_DLLM_CHAIN=0`)."""
        spec = spec or DllmModelSpec.causal(min(runner.tokenizer.eos_token_ids, default=0))
        params = params or DllmParams()
        if block_loop is None:
            block_loop = runner.device.type == "cuda"
        self.block_loop = (block_loop_for(runner, spec, params.block_size, config.max_running_requests)
                           if block_loop and runner.tp.size == 1 else None)
        super().__init__(config, worker_id, runner, control, handoff,
                         forward_fn=self.block_loop.forward if self.block_loop is not None else None)
        self.spec, self.params = spec, params
        self.rounds = RoundManager(self.cache, self.spec, config.max_running_requests,
                                   config.max_prefill_tokens, on_fail=self.fail, on_admit=self.on_admitted)
        self.reception: Optional[KvReception] = None
        if handoff is not None:
            self.reception = KvReception(worker_id, handoff, self.marks, timeouts, self.cache.page_size)
        self.num_commits = 0            # tokens committed, over all blocks
        self.num_block_forwards = 0     # request-forwards that carried a block
        self.num_blocks = 0             # blocks completed
        self.num_finished_block_forwards = 0
        self.commit_trace: Optional[list[tuple]] = None   # (rid, forward_iter, block_start, block_len, positions)
        # overlap: alternate two request groups (True), merge them (False), or decide from
        # measured times (None): alternate while processing a round costs over half a forward
        self.split_groups = split_groups
        self.forward_s = self.process_s = 0.0   # moving averages per round
        if chain_rounds is None:
            chain_rounds = os.environ.get(CHAIN_ENV, "1") != "0"
        self.chain_rounds = self.block_loop is not None and chain_rounds
        self.last_block_round: Optional[int] = None   # forward_iter of the last launch, when a block round
        self.num_chained_rounds = 0     # rounds launched from the tokens of a round still in flight

    # ---- intake ----------------------------------------------------------------
    def admit(self, req: Req, msg) -> None:
        try:
            params = self.params.with_overrides(msg.dllm)
        except (ValueError, TypeError) as e:
            self.fail(req, f"bad request: {e}")
            return
        if req.peer is not None and self.reception is None:
            self.fail(req, "this DLLM worker takes no remotely prefilled prompts ([[dllm]] prefill = \"local\")")
            return
        self.rounds.add(DllmReq(req, params))

    def on_admitted(self, state: DllmReq) -> None:
        """Remote prefill: its pages are reserved, so the prefill worker may send the KV."""
        req = state.req
        if req.peer is None:
            return
        state.awaits_kv = True
        self.marks.note(req.rid, "prefill_launched")     # the prefill worker's mark, not a round here
        self.handoff.send_to(self.reception.expect(req), P.DecodeReady(
            rid=req.rid, decode=self.reception.own_peer, held_len=req.cached_len,
            dllm_attn_block=req.dllm_attn_block))

    def recv_data(self) -> None:
        if self.reception is not None:
            self.reception.receive(self.kv_landed, self.fail)

    def kv_landed(self, req: Req, item: "P.KvReq", msg: "P.KvBatch") -> None:
        state = self.rounds.get(req.rid)
        if state is not None:
            self.rounds.kv_landed(state)

    def forget(self, req: Req) -> None:
        self.rounds.remove(req.rid)
        if self.reception is not None:
            self.reception.forget(req.rid)

    # ---- the role steps ----------------------------------------------------------
    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        if self.reception is not None:
            for req in self.reception.pop_expired():
                self.fail(req, f"no KV from {req.peer.worker_id} in time", retriable=True)
        chain = self.chain_rounds and self.config.overlap
        if self.block_loop is not None:
            self.block_loop.defer_read = chain
        return self.rounds.schedule(split=self.config.overlap and not chain and self.should_split(),
                                    chain_from=self.last_block_round if chain else None)

    def should_split(self) -> bool:
        if self.split_groups is not None:
            return self.split_groups
        return self.process_s > SPLIT_WHEN_PROCESS_OVER * self.forward_s > 0

    def build_forward_input(self, batch: ScheduleBatch):
        self.last_block_round = None
        fi = self.rounds.forward_input(batch)
        if self.block_loop is None or not any(fi.logits_lens) or any(r.sampling.temperature > 0 for r in batch.reqs):
            return fi   # per-forward: prompt chunks only, or a sampled request
        r = build_block_round(self.rounds, batch, fi, self.runner.config.vocab_size, self.block_loop.graphs,
                              pin_memory=self.runner.device.type == "cuda")
        # NOTE: after the round's carry named the rows it chains from
        reqs = [req for req, n in zip(batch.reqs, fi.logits_lens) if n]
        for row, req in enumerate(reqs):
            self.rounds.running[req.rid].round_row = (batch.forward_iter, row)
        self.last_block_round = batch.forward_iter
        self.num_chained_rounds += r.entry_carry is not None
        return r

    def process_batch_result(self, batch: ScheduleBatch, result) -> None:
        self.process_batch_result_dllm(batch, result)

    def process_batch_result_dllm(self, batch: ScheduleBatch, result) -> None:
        """Commit this round's tokens, stream finished blocks, finish requests, then report
        the round under the iteration that launched it (`batch.forward_iter`)."""
        t0 = time.perf_counter()
        if isinstance(result, BlockResult):
            self.commit_block_round(batch, result.wait())
        else:
            rows = self.rounds.block_logits(batch, result.logits)
            for req, logits in zip(batch.reqs, rows):
                req.num_pending = 0
                state = self.rounds.get(req.rid)
                if req.is_finished or state is None or logits is None:
                    continue   # aborted while in flight, or a prompt chunk
                self.step_block(state, logits, batch.forward_iter)
        self.report_prefill_stats(batch, PrefillStats(
            num_new_seqs=batch.batch_size, num_new_tokens=batch.num_tokens,
            cached_len=None, num_prefix_tokens=batch.num_prefix_tokens, token_usage=self.cache.token_usage,
            num_running_reqs=self.num_running_reqs, num_queue_reqs=self.num_queue_reqs))
        self.flush_outputs()
        self.forward_s = _average(self.forward_s, result.timings.get("total_s", 0.0))
        self.process_s = _average(self.process_s, time.perf_counter() - t0)

    def step_block(self, state: DllmReq, logits, forward_iter: Optional[int]) -> None:
        req, block = state.req, state.block
        sp = req.sampling
        if sp.seed is not None and block.num_steps == 0:
            # a block's draws derive from (seed, its first output index), as AR tokens do
            state.generator = token_generator(sp.seed, req.num_output)
        positions = block.step(
            logits, state.params, sp.temperature, state.generator,
            banned=frozenset([self.spec.mask_token_id]) if self.spec.bans_mask else frozenset(),
            banned_before=max(0, sp.min_tokens - 1 - req.num_output), stop_ids=state.stop_ids,
            top_k=sp.top_k, top_p=sp.top_p)
        self.after_steps(state, [positions], forward_iter)

    def commit_block_round(self, batch: ScheduleBatch, result: BlockResult) -> None:
        """A block round's blocks, filled on the device: its rows are the requests that carried one.
        A request's rounds are processed in launch order, so this round filled its oldest block."""
        row = 0
        for req, full in zip(batch.reqs, batch.is_last_chunk):
            req.num_pending = max(0, req.num_pending - 1)
            if not full:
                continue   # a prompt chunk
            i, row = row, row + 1
            state = self.rounds.get(req.rid)
            if req.is_finished or state is None or state.block is None:
                continue   # aborted while in flight, or finished in the round before (a chained round)
            steps = apply_to_block(state.block, result.tokens[i], result.logprobs[i], result.commit_step[i],
                                   result.num_steps[i])
            self.after_steps(state, steps, batch.forward_iter)
            if self.rounds.get(req.rid) is state and state.next_block is not None:
                self.take_next_block(state)

    def take_next_block(self, state: DllmReq) -> None:
        """A chained request whose block was processed: the chained round's block becomes its block."""
        req, block = state.req, state.next_block
        if state.block is not None or block.start != req.seq_len:   # never: a block round fills its block
            self.fail(req, f"chained block at {block.start} does not follow the output ({req.seq_len} tokens)")
            return
        state.block, state.next_block = block, None

    def after_steps(self, state: DllmReq, steps: list[list[int]], forward_iter: Optional[int]) -> None:
        """Count the positions each step committed into the block; finish the block once it is done."""
        block = state.block
        for positions in steps:
            self.num_commits += len(positions)
            self.num_block_forwards += 1
            if self.commit_trace is not None:
                self.commit_trace.append((state.req.rid, forward_iter, block.start, len(block), positions))
        if block.is_done(state.stop_ids):
            self.finish_block(state)

    def finish_block(self, state: DllmReq) -> None:
        """Append the block's tokens (up to the first finish), stream them, free a finished request."""
        req, block = state.req, state.block
        self.num_blocks += 1
        self.num_finished_block_forwards += block.num_steps
        tokens, reason = [], None
        for tok in block.final_tokens(state.stop_ids):
            req.output_ids.append(tok)
            tokens.append(tok)
            reason = check_finish(req, self.tokenizer)
            if reason is not None:
                break
        logprobs = block.logprobs[:len(tokens)] if req.sampling.logprobs else None
        if logprobs is not None:
            req.output_logprobs += logprobs
        state.block = None
        self.outbox.emit(req, tokens, reason, logprobs)
        if reason is not None:
            req.finish_reason = reason
            if state.next_block is not None:
                # a chained round is writing KV past this; its tokens are dropped when it is processed
                req.kv_len, req.num_pending = state.done_kv_len, 0
            self.release(req)

    # ---- gauges ------------------------------------------------------------------
    @property
    def num_running_reqs(self) -> int:
        return len(self.rounds.running)

    @property
    def num_queue_reqs(self) -> int:
        return len(self.rounds.waiting)

    def heartbeat_gauges(self) -> WorkerGauges:
        num_transfer = len(self.reception.transfer_queue) if self.reception is not None else None
        return replace(super().heartbeat_gauges(), num_transfer_reqs=num_transfer,
                       dllm_tokens_per_forward=self.num_commits / max(1, self.num_block_forwards),
                       dllm_forwards_per_block=self.num_finished_block_forwards / max(1, self.num_blocks))


def _average(avg: float, x: float, weight: float = 0.2) -> float:
    return x if avg == 0.0 else (1 - weight) * avg + weight * x
