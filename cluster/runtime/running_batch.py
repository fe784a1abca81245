"""RunningBatch: the running decode requests as rows of host arrays, kept from step to step.

vLLM's persistent batch: row i is `reqs[i]` (admission order, so the newest request is the
last row). A row is written when its request joins, and changed only when the request
leaves (later rows move up one) or crosses into a new page; a steady decode step moves whole
columns (`kv_lens += 1`), so the host work per step does not grow with Python objects per
request. `launch()` hands the step its own copies (`StepRows`): under overlap the forward
still reads them while the scheduler changes the rows for the next step.

What each row mirrors (`rebuilt()` recomputes it from the requests; tests hold them equal):
`kv_lens` = req.kv_len, `page_table[:num_pages]` = req.page_table, `out_lens` = req.num_output
+ req.num_pending (outputs once every launched token is processed), `input_ids` = the token
the next step feeds at position kv_len: known when it joined, else `-(future_slot + 1)`, which
the forward resolves from the future map (every decode forward stores each row's token there).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from cluster.engine.sampler import has_penalty
from cluster.runtime.schedule_batch import Req

_INT = np.int64


def next_input_id(req: Req) -> int:
    """The token fed at position `req.kv_len`: known, or `-(future_slot + 1)` while it is in flight."""
    k = req.kv_len - req.prompt_len
    if k < 0:
        return req.input_ids[req.kv_len]
    if k < len(req.output_ids):
        return req.output_ids[k]
    # in flight: the slot holds the newest launched token (forwards run in launch order)
    assert req.future_slot >= 0, f"{req}: token {req.kv_len} is neither known nor in a future slot"
    return -(req.future_slot + 1)


class RowKind(NamedTuple):
    """What a request's sampling asks of the host, decided once when it joins."""
    host_sampling: bool   # a per-step generator (seed), prior ids (penalties) or grammar
    plain_greedy: bool    # argmax of the raw logits is its token (min_tokens aside)
    plain_result: bool    # its finish is EOS / max_tokens / min_tokens only, and it streams bare tokens

    @classmethod
    def of(cls, req: Req, eos: frozenset) -> "RowKind":
        sp = req.sampling
        penalty = has_penalty(sp)
        return cls(host_sampling=sp.seed is not None or penalty or req.grammar is not None,
                   plain_greedy=sp.is_greedy and not sp.logprobs and not sp.logit_bias and not penalty
                   and req.grammar is None,
                   plain_result=not sp.stop and not sp.stop_token_ids and not sp.logprobs
                   and req.eos_token_ids == eos)


class StepRows(NamedTuple):
    """One launched decode step's copy of the rows (n = batch size)."""
    input_ids: np.ndarray      # int64 [n]
    positions: np.ndarray      # int64 [n]: kv_len before the step (its token's position)
    page_table: np.ndarray     # int64 [n, P]: pages covering position + 1 tokens, padded with 0
    future_slots: np.ndarray   # int64 [n]
    out_lens: np.ndarray       # int64 [n]: outputs once this step's token is appended
    max_tokens: np.ndarray     # int64 [n]
    min_tokens: np.ndarray     # int64 [n]
    eos_on: np.ndarray         # bool [n]: EOS ends it (not ignore_eos)
    plain_result: np.ndarray   # bool [n]
    eos_ids: np.ndarray        # int64: the EOS ids every plain_result row shares
    sampling: list             # SamplingParams per row
    eos_token_ids: list        # frozenset per row (empty under ignore_eos)
    host_rows: list            # rows needing per-step host values (RowKind.host_sampling)
    joined: list               # requests in their first step since they joined (the rest were in the last one)
    all_plain_greedy: bool     # every row's token is the argmax (no EOS ban pending either)


INT_COLS = ("kv_lens", "num_pages", "input_ids", "future_slots", "out_lens", "max_tokens", "min_tokens")
FLAG_COLS = ("eos_on", "plain_result", "plain_greedy")


class RunningBatch:
    def __init__(self, page_size: int, capacity: int = 64, max_pages: int = 16):
        self.page_size = page_size
        self.reqs: list[Req] = []
        self.sampling: list = []                # SamplingParams per row
        self.eos: list = []                     # eos_token_ids per row
        self.common_eos: Optional[frozenset] = None   # the first request's: rows sharing it are plain
        self.kinds: list[RowKind] = []
        self.host_rows: list[int] = []          # rows with RowKind.host_sampling
        self.joined: list[Req] = []             # added since the last launch
        self._alloc(capacity, max_pages)

    def _alloc(self, capacity: int, max_pages: int) -> None:
        """Columns live in two blocks (ints, flags), so a step copies and a leaving row shifts each block
        in one operation; the named columns are views into them."""
        old = getattr(self, "ints", None)
        n = len(self.reqs)
        ints, flags = np.zeros((len(INT_COLS), capacity), _INT), np.zeros((len(FLAG_COLS), capacity), bool)
        table = np.zeros((capacity, max_pages), _INT)
        if old is not None:
            ints[:, :n], flags[:, :n] = self.ints[:, :n], self.flags[:, :n]
            p = min(max_pages, self.page_table.shape[1])
            table[:n, :p] = self.page_table[:n, :p]
        self.ints, self.flags, self.page_table = ints, flags, table
        for k, name in enumerate(INT_COLS):
            setattr(self, name, ints[k])
        for k, name in enumerate(FLAG_COLS):
            setattr(self, name, flags[k])

    def __len__(self) -> int:
        return len(self.reqs)

    def __contains__(self, req: Req) -> bool:
        return req in self.reqs

    # ---- rows join, leave, grow -----------------------------------------------------
    def add(self, req: Req) -> None:
        """Append `req` as the newest row."""
        i = len(self.reqs)
        need_pages = max(len(req.page_table), self.page_table.shape[1])
        if i == len(self.kv_lens) or need_pages > self.page_table.shape[1]:
            self._alloc(max(2 * len(self.kv_lens), i + 1), max(need_pages, 2 * self.page_table.shape[1])
                        if need_pages > self.page_table.shape[1] else need_pages)
        if self.common_eos is None:
            self.common_eos = req.eos_token_ids
            self._eos_ids = np.array(sorted(self.common_eos), dtype=_INT)
        kind = RowKind.of(req, self.common_eos)
        sp = req.sampling
        self.reqs.append(req)
        self.joined.append(req)
        self.sampling.append(sp)
        self.eos.append(frozenset() if sp.ignore_eos else req.eos_token_ids)
        self.kinds.append(kind)
        if kind.host_sampling:
            self.host_rows.append(i)
        self.kv_lens[i] = req.kv_len
        self.set_pages(i, req.page_table)
        self.input_ids[i] = next_input_id(req)
        self.future_slots[i] = req.future_slot
        self.out_lens[i] = req.num_output + req.num_pending
        self.max_tokens[i], self.min_tokens[i] = sp.max_tokens, sp.min_tokens
        self.eos_on[i] = not sp.ignore_eos
        self.plain_result[i], self.plain_greedy[i] = kind.plain_result, kind.plain_greedy

    def remove(self, req: Req) -> bool:
        """Drop `req`'s row; the rows after it move up one (admission order is kept)."""
        try:
            i = self.reqs.index(req)
        except ValueError:
            return False
        n = len(self.reqs)
        for block in (self.ints, self.flags):
            block[:, i:n - 1] = block[:, i + 1:n]
        self.page_table[i:n - 1] = self.page_table[i + 1:n]
        for xs in (self.reqs, self.sampling, self.eos, self.kinds):
            del xs[i]
        if req in self.joined:
            self.joined.remove(req)
        if self.host_rows:
            self.host_rows = [r - (r > i) for r in self.host_rows if r != i]
        return True

    def set_pages(self, i: int, pages: list[int]) -> None:
        if len(pages) > self.page_table.shape[1]:
            self._alloc(len(self.kv_lens), max(len(pages), 2 * self.page_table.shape[1]))
        self.page_table[i, :len(pages)] = pages
        self.page_table[i, len(pages):] = 0
        self.num_pages[i] = len(pages)

    def rows_short_of_pages(self) -> np.ndarray:
        """Rows whose next token does not fit their pages, and how many pages each misses."""
        n = len(self.reqs)
        missing = -(-(self.kv_lens[:n] + 1) // self.page_size) - self.num_pages[:n]
        return np.maximum(missing, 0)

    # ---- one step --------------------------------------------------------------------
    def launch(self) -> StepRows:
        """The step's copy of the rows; then every row moves on one position and will feed its
        future token (the forward stores each row's sampled token into its slot)."""
        n = len(self.reqs)
        ints, flags = self.ints[:, :n].copy(), self.flags[:, :n].copy()
        col = dict(zip(INT_COLS, ints))
        pos, out_lens = col["kv_lens"], col["out_lens"]
        out_lens += 1                                       # the sampled token is output number out_lens
        cols = int(-(-(pos.max() + 1) // self.page_size)) if n else 0
        plain_greedy = bool(flags[2].all()) and not bool((col["min_tokens"] >= out_lens).any())
        rows = StepRows(
            input_ids=col["input_ids"], positions=pos, page_table=self.page_table[:n, :cols].copy(),
            future_slots=col["future_slots"], out_lens=out_lens, max_tokens=col["max_tokens"],
            min_tokens=col["min_tokens"], eos_on=flags[0], plain_result=flags[1],
            eos_ids=self._eos_ids if n else np.zeros(0, _INT), sampling=list(self.sampling),
            eos_token_ids=list(self.eos), host_rows=list(self.host_rows), joined=self.joined,
            all_plain_greedy=plain_greedy)
        self.joined = []
        self.kv_lens[:n] += 1
        self.out_lens[:n] += 1
        np.negative(self.future_slots[:n] + 1, out=self.input_ids[:n])
        return rows

    # ---- the invariant ------------------------------------------------------------------
    def rebuilt(self) -> "RunningBatch":
        """The same requests as a fresh RunningBatch built from their Req state (tests compare)."""
        fresh = RunningBatch(self.page_size)
        fresh.common_eos = self.common_eos
        for req in self.reqs:
            fresh.add(req)
        return fresh

    def state(self) -> dict:
        """The rows as plain lists (equal for two batches over the same requests in the same state)."""
        n = len(self.reqs)
        out = {name: getattr(self, name)[:n].tolist() for name in (
            "kv_lens", "num_pages", "input_ids", "future_slots", "out_lens", "max_tokens", "min_tokens",
            "eos_on", "plain_result", "plain_greedy")}
        out["page_table"] = [row[:k] for row, k in zip(self.page_table[:n].tolist(), out["num_pages"])]
        out["rids"] = [r.rid for r in self.reqs]
        out["host_rows"] = list(self.host_rows)
        return out
