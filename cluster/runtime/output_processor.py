"""Result processing for prefill and decode batches (unified and decode workers).

Both pass the processed batch to the stats calls, so the line names the iteration that
launched the batch, not the later one the worker is already running under overlap.
"""
from __future__ import annotations

from cluster.engine.stop_checker import check_finish
from cluster.runtime.stats import DecodeStats, PrefillStats
from cluster.runtime.schedule_batch import Req, ScheduleBatch


class OutputProcessorMixin:
    """Needs `self.tokenizer`, `self.emit`, `self.release`, `self.flush_outputs`,
    `self.cache`, and the stats methods of SchedulerMetricsMixin."""

    def commit_token(self, req: Req, token: int, logprob=None) -> None:
        req.output_ids.append(token)
        if logprob is not None:
            req.output_logprobs.append(logprob)
        reason = check_finish(req, self.tokenizer)
        self.emit(req, [token], reason, None if logprob is None else [logprob])
        if reason is not None:
            req.finish_reason = reason
            self.release(req)

    def commit_results(self, batch: ScheduleBatch, result) -> None:
        tokens = result.next_token_ids.tolist()
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        for i, req in enumerate(batch.reqs):
            if not batch.sample[i]:
                continue                       # a prefill chunk that is not the last
            req.num_pending -= 1
            if req.is_finished:
                continue                       # finished in an earlier batch: overlap's extra token
            lp = logprobs[i] if logprobs is not None and req.sampling.logprobs else None
            self.commit_token(req, tokens[i], lp)

    def process_batch_result_prefill(self, batch: ScheduleBatch, result) -> None:
        self.commit_results(batch, result)
        self.report_prefill_stats(batch, self.prefill_stats(batch))
        self.flush_outputs()

    def process_batch_result_decode(self, batch: ScheduleBatch, result) -> None:
        self.commit_results(batch, result)
        self.report_decode_stats(batch, self.decode_stats(batch))
        self.flush_outputs()

    def prefill_stats(self, batch: ScheduleBatch) -> PrefillStats:
        return PrefillStats(num_new_seqs=sum(batch.sample), num_new_tokens=batch.num_tokens,
                            num_cached_tokens=batch.num_cached_tokens,
                            token_usage=self.cache.token_usage, num_running_reqs=self.num_running_reqs,
                            num_queue_reqs=self.num_queue_reqs)

    def decode_stats(self, batch: ScheduleBatch) -> DecodeStats:
        return DecodeStats(num_running_reqs=batch.batch_size,
                           num_tokens=sum(p + 1 for p in batch.prefix_lens),
                           token_usage=self.cache.token_usage, num_queue_reqs=self.num_queue_reqs)
