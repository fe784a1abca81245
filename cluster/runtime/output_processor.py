"""Result processing of sampled tokens: the one commit loop, and the object that commits.

`sampled_tokens(batch, result)` walks a processed batch and yields each request that sampled
a token it still wants (not a non-final prefill chunk, not a request that finished or was
aborted while the forward ran: overlap's extra token). The prefill worker ships what it
yields to decode (`process_batch_result_disagg_prefill`); `OutputProcessor.commit`, owned by
every WorkerScheduler and used by the unified and decode workers, appends it, checks finish,
streams it and frees a finished request. Callers pass the batch to the stats calls, so the line names the iteration that
launched it, not the later one the worker is already running under overlap.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np

from cluster.engine.forward_batch import ForwardOutput
from cluster.engine.stop_checker import check_finish
from cluster.runtime.schedule_batch import Req, ScheduleBatch


class SampledToken(NamedTuple):
    req: Req
    token: int
    logprob: Optional[float]                   # when the request asked for logprobs
    top: Optional[list]                        # [[token_id, logprob], ...] when it asked for top_logprobs


def sampled_tokens(batch: ScheduleBatch, result: ForwardOutput) -> Iterator[SampledToken]:
    """Every request this batch sampled for, with its token (and logprobs when asked)."""
    tokens = result.next_token_ids.tolist()
    logprobs = result.logprobs.tolist() if result.logprobs is not None else None
    prompt_lps = result.prompt_logprobs
    for i, req in enumerate(batch.reqs):
        if prompt_lps is not None and prompt_lps[i] is not None:   # echo: every chunk adds its part
            before = req.prompt_logprobs if batch.prefix_lens[i] else None   # a prefill again starts over
            req.prompt_logprobs = (before or []) + prompt_lps[i]
        if not batch.is_last_chunk[i]:
            continue                           # a prefill chunk that is not the last
        req.num_pending -= 1
        if req.is_finished:
            continue                           # finished in an earlier batch: overlap's extra token
        yield SampledToken(req, tokens[i], logprobs[i] if logprobs is not None and req.sampling.logprobs else None,
                           _top_pairs(result, i, req.sampling.top_logprobs))


def _top_pairs(result, row: int, k: int) -> Optional[list]:
    if not k or result.top_ids is None:
        return None
    return [[t, lp] for t, lp in zip(result.top_ids[row, :k].tolist(), result.top_logprobs[row, :k].tolist())]


class OutputProcessor:
    """Commits sampled tokens to their requests and streams them (`emit`); a finished
    request is freed at once (`release`)."""

    def __init__(self, tokenizer, emit: Callable, release: Callable[[Req], None],
                 emit_plain: Optional[Callable[[list, list], None]] = None):
        self.tokenizer, self.emit, self.release = tokenizer, emit, release
        self.emit_plain = emit_plain   # (rids, tokens): one bare token each, nothing finished

    def commit_token(self, req: Req, token: int, logprob: Optional[float] = None,
                     top: Optional[list] = None) -> None:
        req.output_ids.append(token)
        if logprob is not None:
            req.output_logprobs.append(logprob)
        reason = check_finish(req, self.tokenizer)
        self.emit(req, [token], reason, None if logprob is None else [logprob],
                  top_logprobs=None if top is None else [top])
        if reason is not None:
            req.finish_reason = reason
            self.release(req)

    def commit(self, batch: ScheduleBatch, result) -> None:
        if batch.rows is not None and self.emit_plain is not None:
            return self.commit_decode(batch, result)
        for req, token, logprob, top in sampled_tokens(batch, result):
            self.commit_token(req, token, logprob, top)

    def commit_decode(self, batch: ScheduleBatch, result) -> None:
        """A decode step from the running batch: EOS, min_tokens and max_tokens for every row at once;
        only the rows that finish or ask for more (stop strings or ids, logprobs) go one by one
        through `commit_token`. The rest append their token and leave in one `emit_plain`."""
        rows = batch.rows
        ids = result.next_token_ids.numpy()
        is_eos = (ids[:, None] == rows.eos_ids[None, :]).any(axis=1)   # a few EOS ids: cheaper than np.isin
        done = (rows.out_lens >= rows.max_tokens) | (rows.eos_on & is_eos & (rows.out_lens >= rows.min_tokens))
        one_by_one = (done | ~rows.plain_result).tolist()
        tokens = ids.tolist()
        rids, plain = [], []
        for req, token, slow in zip(batch.reqs, tokens, one_by_one):
            req.num_pending -= 1
            if slow or req.finish_reason is not None:   # finished earlier: overlap's extra token
                continue
            req.output_ids.append(token)
            rids.append(req.rid)
            plain.append(token)
        if rids:
            self.emit_plain(rids, plain)
        if any(one_by_one):
            logprobs = result.logprobs.tolist() if result.logprobs is not None else None
            for i in np.flatnonzero(done | ~rows.plain_result).tolist():
                req = batch.reqs[i]
                if req.finish_reason is None:
                    self.commit_token(req, tokens[i], logprobs[i] if logprobs is not None and req.sampling.logprobs
                                      else None, _top_pairs(result, i, req.sampling.top_logprobs))

