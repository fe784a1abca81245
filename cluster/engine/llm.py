"""Offline `LLM.generate`: the single-process reference the cluster is compared against.

A small continuous-batching loop over ModelRunner: admit requests while their pages
(prompt + max_tokens, reserved up front so nothing is ever retracted) fit; prefill the
admitted ones in forwards of at most `max_prefill_tokens` tokens (long prompts are
chunked); otherwise run one batched decode step over every running request.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from cluster.engine.forward_batch import ForwardInput
from cluster.engine.kv_cache import pages_for
from cluster.engine.loader import DEFAULT_MODEL, load_model
from cluster.engine.model_runner import ModelRunner
from cluster.engine.parallel import TpGroup
from cluster.engine.sampler import has_penalty, token_generator
from cluster.engine.stop_checker import check_finish, trim_stop
from cluster.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class GenerateOutput:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None   # per token: (id, logprob), best first
    prompt_logprobs: Optional[list[float]] = None   # prompt tokens 1.. (the first has none)


@dataclass
class _Seq:
    """One request inside `generate` (request-like for stop_checker)."""
    index: int
    input_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    grammar: Optional[object] = None       # RequestGrammar when sampling.grammar_kind is set
    page_table: list[int] = field(default_factory=list)
    num_prefilled: int = 0
    finish_reason: Optional[str] = None

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, path: str = "", load_format: str = "auto",
                 dtype: str = "float32", device: str = "cpu", num_pages: int = 4096, page_size: int = 16,
                 max_batch_size: int = 256, max_prefill_tokens: int = 4096, seed: int = 0,
                 tp: TpGroup = TpGroup(), cpu_weights: str = "native", tp_invariant: bool = False,
                 kv_dtype: str = "auto"):
        """`tp`: this process is one rank of a tensor-parallel group; every rank calls `generate`
        with the same arguments (parallel.py). `cpu_weights`, `tp_invariant`, `kv_dtype`: as `[model]`'s."""
        self.loaded = load_model(model, path, load_format, dtype, device, seed, tp=tp, cpu_weights=cpu_weights,
                                 tp_invariant=tp_invariant)
        self.runner = ModelRunner(self.loaded, num_pages, page_size, device, dtype, kv_dtype=kv_dtype)
        self.tokenizer = self.loaded.tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.loaded.config.eos_token_ids)
        self._grammar_backend = None

    @property
    def grammar_backend(self):
        if self._grammar_backend is None:
            from cluster.engine.grammar import GrammarBackend
            self._grammar_backend = GrammarBackend(self.tokenizer, self.loaded.config.vocab_size)
        return self._grammar_backend

    def generate(self, prompts: Union[list[str], list[list[int]]],
                 sampling: Union[SamplingParams, list[SamplingParams], None] = None) -> list[GenerateOutput]:
        sampling = sampling or SamplingParams()
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        seqs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            seq = _Seq(i, ids, sp, frozenset() if sp.ignore_eos else self.eos_token_ids)
            if sp.grammar_kind:
                seq.grammar = self.grammar_backend.matcher(sp.grammar_kind, sp.grammar_spec,
                                                           stop_token_ids=seq.eos_token_ids | set(sp.stop_token_ids))
            seqs.append(seq)
        waiting, running = deque(seqs), []
        alloc, page_size = self.runner.page_allocator, self.runner.page_size
        while waiting or running:
            admitted = []
            while waiting and len(running) + len(admitted) < self.max_batch_size:
                need = pages_for(len(waiting[0].input_ids) + waiting[0].sampling.max_tokens, page_size)
                if not alloc.can_allocate(need):
                    if not running and not admitted:
                        raise MemoryError(f"request {waiting[0].index} needs {need} pages; pool has {alloc.num_pages}")
                    break
                seq = waiting.popleft()
                seq.page_table = alloc.allocate(need)
                admitted.append(seq)
            if admitted:
                self._prefill(admitted)
                running += admitted
            else:
                self._decode(running)
            for seq in [s for s in running if s.finish_reason is not None]:
                alloc.free(seq.page_table)
                running.remove(seq)
        return [self._output(s) for s in seqs]

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Whole prompts, in forwards of <= max_prefill_tokens tokens (a long prompt spans several)."""
        pending = deque(seqs)
        while pending:
            batch, lens, budget = [], [], self.max_prefill_tokens
            while pending and budget > 0:
                seq = pending[0]
                n = min(len(seq.input_ids) - seq.num_prefilled, budget)
                batch.append(seq)
                lens.append(n)
                budget -= n
                if seq.num_prefilled + n == len(seq.input_ids):
                    pending.popleft()
                else:
                    break   # chunk boundary: the rest goes in the next forward
            ids = [t for s, n in zip(batch, lens) for t in s.input_ids[s.num_prefilled:s.num_prefilled + n]]
            done = [s.num_prefilled + n == len(s.input_ids) for s, n in zip(batch, lens)]
            self._run(batch, ids, lens, [s.num_prefilled for s in batch], done, is_decode=False)
            for s, n in zip(batch, lens):
                s.num_prefilled += n

    def _decode(self, seqs: list[_Seq]) -> None:
        self._run(seqs, [s.output_ids[-1] for s in seqs], [1] * len(seqs), [len(s.all_ids) - 1 for s in seqs],
                  [True] * len(seqs), is_decode=True)

    def _run(self, seqs, ids, extend_lens, prefix_lens, sample, is_decode: bool) -> None:
        fi = ForwardInput(
            input_ids=torch.tensor(ids, dtype=torch.int64), extend_lens=extend_lens, prefix_lens=prefix_lens,
            page_tables=[s.page_table for s in seqs], sample=sample, sampling=[s.sampling for s in seqs],
            generators=[token_generator(s.sampling.seed, len(s.output_ids), self.device)
                        if s.sampling.seed is not None else None for s in seqs],
            prior_ids=[s.all_ids if has_penalty(s.sampling) else [] for s in seqs],
            min_tokens_left=[s.sampling.min_tokens - len(s.output_ids) for s in seqs],
            eos_token_ids=[s.eos_token_ids for s in seqs], is_decode=is_decode,
            grammars=[s.grammar for s in seqs],
            prompt_targets=[s.input_ids[p + 1:min(p + n + 1, len(s.input_ids))]
                            if s.sampling.prompt_logprobs and not is_decode else []
                            for s, p, n in zip(seqs, prefix_lens, extend_lens)])
        out = self.runner.forward(fi)
        for i, s in enumerate(seqs):
            if out.prompt_logprobs is not None and out.prompt_logprobs[i] is not None:
                s.prompt_logprobs += out.prompt_logprobs[i]
            if not sample[i]:
                continue
            s.output_ids.append(int(out.next_token_ids[i]))
            if out.logprobs is not None and s.sampling.logprobs:
                s.output_logprobs.append(float(out.logprobs[i]))
                if s.sampling.top_logprobs:
                    k = s.sampling.top_logprobs
                    s.output_top.append(list(zip(out.top_ids[i, :k].tolist(), out.top_logprobs[i, :k].tolist())))
            s.finish_reason = check_finish(s, self.tokenizer)

    def _output(self, s: _Seq) -> GenerateOutput:
        text = self.tokenizer.decode(s.output_ids, skip_special_tokens=True)
        if s.sampling.stop:
            text = trim_stop(text, s.sampling.stop)
        return GenerateOutput(s.output_ids, text, s.finish_reason or "length", s.input_ids,
                              s.output_logprobs if s.sampling.logprobs else None,
                              s.output_top if s.sampling.top_logprobs else None,
                              s.prompt_logprobs if s.sampling.prompt_logprobs else None)
