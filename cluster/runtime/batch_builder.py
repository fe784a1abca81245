"""ScheduleBatch -> ForwardInput, on the scheduler thread at launch.

Under overlap a decode request's newest token may not be known yet (its batch is
still running): it goes in as `-(slot + 1)` and the forward side resolves it from the
future-token map, after the previous forward wrote it there.
"""
from __future__ import annotations

import torch

from cluster.engine.forward_batch import ForwardInput
from cluster.engine.sampler import has_penalty, token_generator
from cluster.runtime.schedule_batch import ForwardMode, ScheduleBatch


def _segment_ids(req, start: int, end: int) -> list[int]:
    """Ids of positions [start, end) without copying the whole sequence (decode: one id)."""
    p = req.prompt_len
    ids = list(req.input_ids[start:min(end, p)]) + req.output_ids[max(start - p, 0):max(end - p, 0)]
    if len(ids) < end - start:        # the newest token is still in flight
        assert len(ids) == end - start - 1 and req.future_slot >= 0, f"{req}: token {end - 1} not launched"
        ids.append(-(req.future_slot + 1))
    return ids


def _prompt_targets(req, prefix: int, extend: int) -> list[int]:
    """The prompt ids that positions prefix .. prefix+extend-1 predict, when the request wants its
    prompt logprobs (first prefill only: a re-prefill already sent them)."""
    if not req.sampling.prompt_logprobs or req.num_output or prefix >= req.prompt_len - 1:
        return []
    return list(req.input_ids[prefix + 1:min(prefix + extend + 1, req.prompt_len)])


def build_forward_input(batch: ScheduleBatch) -> ForwardInput:
    if batch.rows is not None:
        return decode_forward_input(batch)
    ids: list[int] = []
    for req, prefix, extend in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
        ids += _segment_ids(req, prefix, prefix + extend)
    reqs = batch.reqs
    return ForwardInput(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        extend_lens=list(batch.extend_lens),
        prefix_lens=list(batch.prefix_lens),
        page_tables=[list(r.page_table) for r in reqs],
        sample=list(batch.is_last_chunk),
        sampling=[r.sampling for r in reqs],
        # the sampled token's output index: tokens already out plus those launched before it
        generators=[token_generator(r.sampling.seed, r.num_output + r.num_pending - 1)
                    if s and r.sampling.seed is not None else None for r, s in zip(reqs, batch.is_last_chunk)],
        # every id before the sampled one (a mixed step's decode row: its newest may be a future)
        prior_ids=[_segment_ids(r, 0, p + e) if has_penalty(r.sampling) else []
                   for r, p, e in zip(reqs, batch.prefix_lens, batch.extend_lens)],
        # tokens still to come before EOS is allowed (the sampled one counts as num_output + 1)
        min_tokens_left=[max(0, r.sampling.min_tokens - (r.num_output + r.num_pending - 1)) for r in reqs],
        eos_token_ids=[frozenset() if r.sampling.ignore_eos else r.eos_token_ids for r in reqs],
        future_slots=[r.future_slot if s else -1 for r, s in zip(reqs, batch.is_last_chunk)],
        grammars=[r.grammar for r in reqs],
        prompt_targets=[_prompt_targets(r, p, e) for r, p, e in zip(reqs, batch.prefix_lens, batch.extend_lens)],
        bidirectional_lens=[0] * len(reqs),
        is_decode=batch.mode == ForwardMode.DECODE,
    )


def decode_forward_input(batch: ScheduleBatch) -> ForwardInput:
    """A decode step from its RunningBatch rows: whole arrays, plus per-row values only for the rows
    whose sampling needs them each step (a seed's generator, penalties' prior ids, a grammar)."""
    rows, reqs = batch.rows, batch.reqs
    n = len(reqs)
    generators: list = []
    prior_ids: list = []
    grammars: list = []
    if rows.host_rows:
        generators, prior_ids, grammars = [None] * n, [[]] * n, [None] * n
        out_lens = rows.out_lens
        for i in rows.host_rows:
            r = reqs[i]
            sp = r.sampling
            if sp.seed is not None:   # the sampled token is output number out_lens[i]
                generators[i] = token_generator(sp.seed, int(out_lens[i]) - 1)
            if has_penalty(sp):   # the token this step feeds may still be in flight: its future slot
                token = int(rows.input_ids[i])
                prior_ids[i] = r.all_ids + [token] if r.seq_len <= rows.positions[i] else r.all_ids
            grammars[i] = r.grammar
    min_left = rows.min_tokens - (rows.out_lens - 1)
    return ForwardInput(
        input_ids=torch.from_numpy(rows.input_ids),
        extend_lens=[1] * n,
        prefix_lens=batch.prefix_lens,
        page_tables=[],
        block_table=torch.from_numpy(rows.page_table),
        sample=[True] * n,
        sampling=rows.sampling,
        generators=generators,
        prior_ids=prior_ids,
        min_tokens_left=min_left.clip(min=0).tolist() if (min_left > 0).any() else [],
        eos_token_ids=rows.eos_token_ids,
        future_slots=rows.future_slots.tolist(),
        grammars=grammars if any(g is not None for g in grammars) else [],
        is_decode=True,
        all_greedy=rows.all_plain_greedy,
    )
