"""Which KV heads each tensor-parallel rank holds, and which prefill rank a decode rank reads each
of its heads from when the two workers have different TP sizes.

The rule is engine/parallel.TpLayout's (vLLM's GQA rule): with `num_kv_heads >= tp` rank r holds
heads [r * kv / tp, (r + 1) * kv / tp); with fewer KV heads than ranks each head is replicated on
`tp / kv` consecutive ranks and rank r holds head `r * kv // tp`. Latent attention (MLA) keeps one
latent "head" on every rank, which is the same rule with kv = 1.

`head_pieces(src, dst, dst_rank)` is the whole map: pure, so every pair of sizes is tested in
process, and every decode rank computes its own share without asking anyone.
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A TP layout that does not split a model's KV heads by the rule above."""


@dataclass(frozen=True, slots=True)
class HeadSplit:
    """`num_kv_heads` KV heads (the whole model's) over `tp` ranks."""
    num_kv_heads: int
    tp: int = 1

    def __post_init__(self) -> None:
        kv, tp = self.num_kv_heads, self.tp
        if kv < 1 or tp < 1:
            raise LayoutError(f"{kv} KV heads over tp={tp}")
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise LayoutError(f"{kv} KV heads do not split over tp={tp}: one must divide the other")

    @classmethod
    def of_rank(cls, num_kv_heads: int, tp: int, heads_per_rank: int) -> "HeadSplit":
        """The split a sender announced (`tp`, `heads_per_rank`), checked against this model's heads."""
        split = cls(num_kv_heads, tp)
        if heads_per_rank != split.heads_per_rank:
            raise LayoutError(f"tp={tp} with {heads_per_rank} KV heads per rank: this model's "
                              f"{num_kv_heads} KV heads give {split.heads_per_rank} per rank")
        return split

    @property
    def heads_per_rank(self) -> int:
        return max(1, self.num_kv_heads // self.tp)

    def first_head(self, rank: int) -> int:
        return rank * self.num_kv_heads // self.tp

    def holders(self, head: int) -> list[int]:
        """The ranks that hold `head` (several when it is replicated)."""
        return [r for r in range(self.tp) if self.first_head(r) <= head < self.first_head(r) + self.heads_per_rank]


@dataclass(frozen=True, slots=True)
class HeadPiece:
    """`count` KV heads a decode rank reads from one prefill rank: from head `src_head` of that
    rank's pool into head `dst_head` of its own (offsets within each rank's pool)."""
    src_rank: int
    src_head: int
    dst_head: int
    count: int


def head_pieces(src: HeadSplit, dst: HeadSplit, dst_rank: int) -> list[HeadPiece]:
    """What decode rank `dst_rank` of `dst` reads, and from which ranks of `src`: exactly its own
    heads, each once. A head replicated on several source ranks is read from one of them, chosen by
    `dst_rank` so that the decode ranks spread their reads over the replicas."""
    if src.num_kv_heads != dst.num_kv_heads:
        raise LayoutError(f"{src.num_kv_heads} KV heads sent, this model has {dst.num_kv_heads}")
    if not 0 <= dst_rank < dst.tp:
        raise LayoutError(f"rank {dst_rank} of tp={dst.tp}")
    pieces: list[HeadPiece] = []
    first = dst.first_head(dst_rank)
    for i in range(dst.heads_per_rank):
        holders = src.holders(first + i)
        rank = holders[dst_rank % len(holders)]
        offset = first + i - src.first_head(rank)
        last = pieces[-1] if pieces else None
        if last and last.src_rank == rank and last.src_head + last.count == offset:
            pieces[-1] = HeadPiece(rank, last.src_head, last.dst_head, last.count + 1)
        else:
            pieces.append(HeadPiece(rank, offset, i, 1))
    return pieces
