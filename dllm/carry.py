"""Carry: the ids of a chained round's input that are still on the device.

A chained round (round_manager.py) is launched before the block round it follows was processed,
so the tokens of each request's in-flight block are known on the device only. Its `ForwardInput`
holds placeholders there; a `Carry` names, for each, the token of the previous round's device
state (`BlockState.tokens[row, j]`) that replaces it. The block loop gathers them once, before
anything of the new round is loaded (a graph bucket's static state is reused by the next round).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from cluster.runtime.schedule_batch import ScheduleBatch


@dataclass
class Carry:
    source_iter: int            # the block round whose device state holds the tokens
    index: torch.Tensor         # int64 [3, n]: token index in the input, source row, source position

    @property
    def token_at(self) -> torch.Tensor:
        return self.index[0]

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n] on `tokens`' device: the carried ids, from the source round's `[rows, width]` tokens."""
        index = self.index.to(tokens.device, non_blocking=True)
        return tokens.reshape(-1).index_select(0, index[1] * tokens.shape[1] + index[2])


def carry_of(rounds, batch: ScheduleBatch, extend_lens: list[int], prefix_lens: list[int],
             pin_memory: bool = False) -> Optional[Carry]:
    """The carry of an input laid out as `rounds.forward_input` lays out `batch` with these lengths
    (a round's forward, or a later step's): per request with a block, positions `[prefix, block.start)`
    past `seq_len` are its in-flight block's, whose row `round_row` names. None: nothing carried."""
    token_at, rows, cols, sources = [], [], [], set()
    offset = 0
    for req, prefix, extend, full in zip(batch.reqs, prefix_lens, extend_lens, batch.is_last_chunk):
        state = rounds.running[req.rid]
        if full and state.newest_block.start > max(prefix, req.seq_len):
            source_iter, row = state.round_row
            sources.add(source_iter)
            p = np.arange(max(prefix, req.seq_len), state.newest_block.start)
            token_at.append(offset + p - prefix)
            cols.append(p - req.seq_len)
            rows.append(np.full(p.size, row))
        offset += extend
    if not token_at:
        return None
    assert len(sources) == 1, f"a round chains from one round, not {sorted(sources)}"
    index = torch.from_numpy(np.stack([np.concatenate(a) for a in (token_at, rows, cols)]).astype(np.int64))
    return Carry(sources.pop(), index.pin_memory() if pin_memory else index)
