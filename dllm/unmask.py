"""The greedy commit rules as tensor ops over a whole batch of blocks, for a denoising loop that
stays on the device (block_loop.py): no `.item()`, no `.cpu()`, no shape that depends on values,
so one step can be captured in a CUDA graph and replayed.

`BlockState` holds every block of a batch as rows of `[B, L]` tensors (L: the widest block;
positions past a row's own length are outside it). `unmask_step(state, logits)` is one forward's
commits for every row, exactly `ActiveBlock.step` with temperature 0 (algorithms.py): banned
ids, stop ids banned before `min_tokens`, argmax with its softmax probability as confidence,
then per row either the threshold rule (every masked position above it, else the most
confident) or the fixed-steps plan (the step's planned count of most confident positions, ties
to the leftmost). A row whose block is complete, or whose committed leading run holds a stop id,
is left alone, as the host loop stops stepping such a block.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from cluster.dllm_params import DllmParams
from dllm.block import ActiveBlock


@dataclass
class BlockState:
    """Every tensor is a view into one byte buffer (`storage`), so a host state reaches the
    device, or a graph's static state, in one copy."""
    tokens: torch.Tensor        # int64 [B, L]: committed ids; the mask id where masked
    masked: torch.Tensor        # bool [B, L]: still to be filled
    in_block: torch.Tensor      # bool [B, L]: position j < the row's block length
    logprobs: torch.Tensor      # float32 [B, L]: logprob of each committed token when committed
    commit_step: torch.Tensor   # int64 [B, L]: the row's step that committed position j, -1 before
    num_steps: torch.Tensor     # int64 [B]: steps the block has taken
    threshold: torch.Tensor     # float32 [B]: low_confidence rows
    is_fixed: torch.Tensor      # bool [B]: the fixed_steps rule, else low_confidence
    plan: torch.Tensor          # int64 [B, L + 1]: positions step k commits; L past the plan (= all left)
    early: torch.Tensor         # bool [B, L]: stop ids are banned here (before min_tokens)
    stop_ids: torch.Tensor      # int64 [B, K]: the row's stop ids, padded with the vocabulary size
    banned: torch.Tensor        # int64 [Kb]: ids that never come out (a real mask token), padded likewise
    num_active: torch.Tensor    # int64 [1]: rows still filling after the last step
    storage: Optional[torch.Tensor] = None   # uint8: all of the above (None for a view of some rows)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "storage"}

    @classmethod
    def build(cls, blocks: Sequence[ActiveBlock], params: Sequence[DllmParams], stop_ids: Sequence[frozenset],
              banned_before: Sequence[int], banned: frozenset, vocab_size: int, mask_token_id: int,
              rows: int = 0, width: int = 0, num_stop_ids: int = 0, num_banned: int = 0,
              pin_memory: bool = False) -> "BlockState":
        """Host tensors of these blocks (their current commits and steps), padded to `rows` rows of
        `width` positions, stop lists to `num_stop_ids`, the banned list to `num_banned` (0: as needed);
        `pin_memory` for a CUDA device to copy them from without waiting."""
        n = len(blocks)
        width = max([width] + [len(b) for b in blocks])
        stops = [sorted(t for t in s if 0 <= t < vocab_size) for s in stop_ids]
        k = max([num_stop_ids, 1] + [len(s) for s in stops])
        state = cls.empty(max(rows, n), width, k, max(num_banned, len(banned), 1), vocab_size, mask_token_id, "cpu",
                          pin_memory)
        if n:   # whole fields at once from padded lists (a batch of 64 blocks is built every round)
            h = {name: t.numpy() for name, t in state.tensors.items()}
            h["tokens"][:n] = _padded([b.input_ids(mask_token_id) for b in blocks], width, mask_token_id)
            h["masked"][:n] = _padded([[t is None for t in b.tokens] for b in blocks], width, False)
            h["in_block"][:n] = _padded([[True] * len(b) for b in blocks], width, False)
            h["logprobs"][:n] = _padded([b.logprobs for b in blocks], width, 0.0)
            h["num_steps"][:n] = [b.num_steps for b in blocks]
            h["threshold"][:n] = [p.threshold for p in params]
            h["is_fixed"][:n] = [b.plan is not None for b in blocks]
            h["plan"][:n] = _padded([b.plan or [] for b in blocks], width + 1, width)
            h["early"][:n] = _padded([[True] * min(max(e, 0), len(b)) for b, e in zip(blocks, banned_before)],
                                     width, False)
            h["stop_ids"][:n] = _padded(stops, k, vocab_size)
        ids = sorted(t for t in banned if 0 <= t < vocab_size)
        state.banned[:len(ids)] = torch.tensor(ids, dtype=torch.int64)
        state.num_active.fill_(int(active_rows(state).sum()))
        return state

    @classmethod
    def empty(cls, rows: int, width: int, num_stop_ids: int, num_banned: int, vocab_size: int,
              mask_token_id: int, device, pin_memory: bool = False) -> "BlockState":
        """Rows with no block (padding): nothing masked, nothing active."""
        shapes = {"tokens": (rows, width), "masked": (rows, width), "in_block": (rows, width),
                  "logprobs": (rows, width), "commit_step": (rows, width), "num_steps": (rows,),
                  "threshold": (rows,), "is_fixed": (rows,), "plan": (rows, width + 1), "early": (rows, width),
                  "stop_ids": (rows, num_stop_ids), "banned": (num_banned,), "num_active": (1,)}
        offsets, total = {}, 0
        for f in fields(cls):
            if f.name in shapes:
                offsets[f.name] = total
                total += -(-_DTYPES[f.name].itemsize * _numel(shapes[f.name]) // 8) * 8   # 8-byte aligned
        storage = torch.zeros(total, dtype=torch.uint8, device=device, pin_memory=pin_memory)
        views = {name: storage[o:o + _DTYPES[name].itemsize * _numel(shapes[name])].view(_DTYPES[name])
                 .view(shapes[name]) for name, o in offsets.items()}
        state = cls(**views, storage=storage)
        state.tokens.fill_(mask_token_id)
        state.commit_step.fill_(-1)
        state.plan.fill_(width)
        state.stop_ids.fill_(vocab_size)
        state.banned.fill_(vocab_size)
        return state

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(rows, width, stop ids per row, banned ids): equal shapes can be `load`ed."""
        return (*self.tokens.shape, self.stop_ids.shape[1], self.banned.numel())

    def load(self, host: "BlockState") -> None:
        """Copy a host state of the same shape into this one: one non-blocking copy (a graph's static state)."""
        assert host.shape == self.shape, (host.shape, self.shape)
        self.storage.copy_(host.storage, non_blocking=True)

    def rows(self, n: int) -> "BlockState":
        """The first `n` rows (views), e.g. to read a padded state back."""
        return BlockState(**{name: t if name in ("banned", "num_active") else t[:n]
                             for name, t in self.tensors.items()})

    def to(self, device, non_blocking: bool = False) -> "BlockState":
        out = BlockState.empty(*self.shape, 0, 0, device)
        out.load(self) if non_blocking else out.storage.copy_(self.storage)
        return out


_DTYPES = {"tokens": torch.int64, "masked": torch.bool, "in_block": torch.bool, "logprobs": torch.float32,
           "commit_step": torch.int64, "num_steps": torch.int64, "threshold": torch.float32, "is_fixed": torch.bool,
           "plan": torch.int64, "early": torch.bool, "stop_ids": torch.int64, "banned": torch.int64,
           "num_active": torch.int64}


def _numel(shape: tuple) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _padded(rows: list, width: int, fill) -> list[list]:
    return [list(r) + [fill] * (width - len(r)) for r in rows]


def ended(state: BlockState) -> torch.Tensor:
    """bool [B]: the row's committed leading run holds a stop id (the block ends there)."""
    lead = torch.cumprod((~state.masked & state.in_block).to(torch.int32), dim=1).bool()
    is_stop = (state.tokens[:, :, None] == state.stop_ids[:, None, :]).any(-1)
    return (lead & is_stop).any(1)


def active_rows(state: BlockState) -> torch.Tensor:
    """bool [B]: blocks still filling (a masked position left and no stop in the leading run)."""
    return state.masked.any(1) & ~ended(state)


def unmask_step(state: BlockState, logits: torch.Tensor) -> None:
    """One forward's commits, in place. `logits` [B, L, V]: row (b, j) predicts block position j."""
    b, width, vocab = logits.shape
    ban_ids = torch.zeros(vocab + 1, dtype=torch.bool, device=logits.device).index_fill_(0, state.banned, True)
    stop_ban = torch.zeros(b, vocab + 1, dtype=torch.bool, device=logits.device).scatter_(1, state.stop_ids, True)
    ban = ban_ids[None, None, :vocab] | (state.early[:, :, None] & stop_ban[:, None, :vocab])
    cand = logits.float().masked_fill(ban, float("-inf"))
    confidence, tokens = cand.softmax(dim=-1).max(dim=-1)                          # [B, L]
    active = active_rows(state)
    live = state.masked & active[:, None]
    conf = torch.where(live, confidence, torch.full_like(confidence, -1.0))       # probabilities are >= 0
    # low confidence: every live position above the threshold, else the most confident (leftmost)
    above = live & (confidence > state.threshold[:, None])
    best = torch.zeros_like(live).scatter_(1, conf.argmax(dim=1, keepdim=True), True) & live
    low_pick = above | (best & ~above.any(dim=1, keepdim=True))
    # fixed steps: the plan's count for this step, most confident first, ties to the leftmost
    count = state.plan.gather(1, state.num_steps.clamp(max=state.plan.shape[1] - 1)[:, None])
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=order.device).expand(b, width))
    fixed_pick = live & (rank < count)
    pick = torch.where(state.is_fixed[:, None], fixed_pick, low_pick)
    logprob = torch.log_softmax(cand, dim=-1).gather(2, tokens[:, :, None])[:, :, 0]
    state.tokens.copy_(torch.where(pick, tokens, state.tokens))
    state.logprobs.copy_(torch.where(pick, logprob, state.logprobs))
    state.commit_step.copy_(torch.where(pick, state.num_steps[:, None], state.commit_step))
    state.masked.logical_and_(~pick)
    state.num_steps.add_(active.to(torch.int64))
    state.num_active.copy_(active_rows(state).sum().view(1))


def apply_to_block(block: ActiveBlock, tokens: list[int], logprobs: list[float], commit_step: list[int],
                   num_steps: int) -> list[list[int]]:
    """Write one row read back from the device into its host block; -> the positions each of the
    row's new steps committed (for the commit trace)."""
    first = block.num_steps
    steps: list[list[int]] = [[] for _ in range(num_steps - first)]
    for j in range(len(block)):
        k = commit_step[j]
        if k >= first and block.tokens[j] is None:
            block.tokens[j] = tokens[j]
            block.logprobs[j] = logprobs[j]
            steps[k - first].append(j)
    block.num_steps = num_steps
    return steps
