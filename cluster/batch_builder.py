"""ScheduleBatch -> ForwardInput, on the scheduler thread at launch.

Under overlap a decode request's newest token may not be known yet (its batch is
still running): it goes in as `-(slot + 1)` and the forward side resolves it from the
future-token map, after the previous forward wrote it there.
"""
from __future__ import annotations

import torch

from cluster.engine.forward_batch import ForwardInput
from cluster.schedule_batch import ForwardMode, ScheduleBatch


def _has_penalty(sp) -> bool:
    return sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0


def build_forward_input(batch: ScheduleBatch) -> ForwardInput:
    ids: list[int] = []
    for req, prefix, extend in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
        known = req.all_ids
        for pos in range(prefix, prefix + extend):
            if pos < len(known):
                ids.append(known[pos])
            else:
                assert pos == len(known) and req.future_slot >= 0, f"{req}: token {pos} not launched"
                ids.append(-(req.future_slot + 1))
    reqs = batch.reqs
    return ForwardInput(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        extend_lens=list(batch.extend_lens),
        prefix_lens=list(batch.prefix_lens),
        page_tables=[list(r.page_table) for r in reqs],
        sample=list(batch.sample),
        sampling=[r.sampling for r in reqs],
        generators=[r.generator for r in reqs],
        prior_ids=[r.all_ids if _has_penalty(r.sampling) else [] for r in reqs],
        # tokens still to come before EOS is allowed (the sampled one counts as num_output + 1)
        min_tokens_left=[max(0, r.sampling.min_tokens - (r.num_output + r.num_pending - 1)) for r in reqs],
        eos_token_ids=[frozenset() if r.sampling.ignore_eos else r.eos_token_ids for r in reqs],
        future_slots=[r.future_slot if s else -1 for r, s in zip(reqs, batch.sample)],
        bidirectional_lens=[0] * len(reqs),
        is_decode=batch.mode == ForwardMode.DECODE,
    )
