"""Structured outputs: xgrammar matchers and the token mask the sampler applies.

A request's constraint is two SamplingParams fields, `grammar_kind` (json_object |
json_schema | regex | ebnf) and `grammar_spec` (the schema as JSON text, the regex, the
EBNF). Its state is the spec plus the tokens accepted so far, and nothing else: that is
what travels with a request between workers (the original SamplingParams plus
`output_ids`, and the first token in `kv_batch`); the receiving worker compiles the spec
(cached per worker) and replays the tokens into a fresh matcher (`GrammarBackend.matcher`).

Who advances a matcher, and why that works under the overlap loop. The scheduler launches
decode batch N+1 before it has seen N's sampled token, so it cannot compute N+1's mask.
It does not need to: the mask is filled on the forward side, inside `ModelRunner.forward`,
from the request's matcher, and right after sampling the same forward accepts the sampled
token into that matcher. Forwards run one at a time in launch order (ForwardExecutor), so
when N+1 fills its mask the matcher has already taken N's token -- the same ordering that
lets N+1's input id be read from the future-token map (`-(slot + 1)`) written by N. The
matcher is the grammar's future map. The scheduler thread touches a matcher only while no
launched forward holds its request: at admission (replaying output ids, and on a decode
worker the prefill's first token) before the request's first forward. A request that
finished in N but still rides in N+1 (overlap's extra token, dropped later) has a
terminated matcher: it gets no mask and accepts nothing.

On CUDA the bitmask is filled on the CPU after the model's kernels are queued, so the
fill overlaps the forward; only the apply (one small kernel) is on the device.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Iterable, Optional

import torch

from cluster.sampling_params import GRAMMAR_KINDS

logger = logging.getLogger(__name__)

_JSON_OBJECT = '{"type": "object"}'


class GrammarError(ValueError):
    """The spec does not compile (bad schema, regex or EBNF)."""


def _xgrammar():
    import xgrammar   # imported on first use: ~2 s, and most workers never need it
    return xgrammar


class RequestGrammar:
    """One request's matcher. Not thread-safe: see the module docstring for who calls it."""

    __slots__ = ("matcher", "is_failed")

    def __init__(self, matcher):
        self.matcher = matcher
        self.is_failed = False     # a token outside the grammar was forced in (e.g. by max bias)

    @property
    def is_active(self) -> bool:
        return not self.is_failed and not self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        if not self.is_active:
            return False
        if not self.matcher.accept_token(int(token)):
            self.is_failed = True
            logger.warning("token %d is outside the grammar; the request runs unconstrained from here", token)
            return False
        return True


class GrammarBackend:
    """One per worker: compiles specs for one tokenizer and vocabulary (cached), makes matchers."""

    def __init__(self, tokenizer, vocab_size: int):
        xgr = _xgrammar()
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        encoded = [""] * max(vocab_size, tokenizer.vocab_size)
        for text, i in vocab.items():
            encoded[i] = text
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size,
                                      stop_token_ids=sorted(tokenizer.eos_token_ids),
                                      add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._lock = threading.Lock()   # the router compiles from several request threads

    def compile(self, kind: str, spec: str):
        try:
            with self._lock:
                if kind == "json_object":
                    return self.compiler.compile_json_schema(_JSON_OBJECT, any_whitespace=False)
                if kind == "json_schema":
                    # compact separators, no free whitespace: a small model cannot loop on blanks
                    return self.compiler.compile_json_schema(spec, any_whitespace=False, strict_mode=True)
                if kind == "regex":
                    return self.compiler.compile_regex(spec)
                if kind == "ebnf":
                    return self.compiler.compile_grammar(spec)
        except RuntimeError as e:   # xgrammar reports bad specs as RuntimeError with a C++ location
            raise GrammarError(_short(str(e))) from None
        raise GrammarError(f"unknown grammar kind {kind!r}; one of {', '.join(GRAMMAR_KINDS)}")

    def matcher(self, kind: str, spec: str, accepted: Iterable[int] = (),
                stop_token_ids: Optional[Iterable[int]] = None) -> RequestGrammar:
        """A matcher that has taken `accepted` (the request's output ids so far)."""
        stops = sorted(set(stop_token_ids)) if stop_token_ids else None
        grammar = RequestGrammar(_xgrammar().GrammarMatcher(self.compile(kind, spec), override_stop_tokens=stops))
        for t in accepted:
            grammar.accept(t)
        return grammar


def apply_grammar_masks(logits: torch.Tensor, grammars: list[Optional[RequestGrammar]]) -> None:
    """Sets to -inf, in place, every token the row's grammar does not allow next."""
    rows = [i for i, g in enumerate(grammars) if g is not None and g.is_active]
    if not rows:
        return
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i in rows:
        grammars[i].fill(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def accept_sampled(grammars: list[Optional[RequestGrammar]], next_ids: torch.Tensor) -> None:
    if any(g is not None for g in grammars):
        for g, t in zip(grammars, next_ids.tolist()):
            if g is not None:
                g.accept(t)


def check_spec(kind: str, spec: str) -> None:
    """Cheap checks without a tokenizer (the router compiles too, with its own backend)."""
    if kind not in GRAMMAR_KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}; one of {', '.join(GRAMMAR_KINDS)}")
    if kind == "json_schema":
        try:
            if not isinstance(json.loads(spec), dict):
                raise GrammarError("a JSON schema must be an object")
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    elif kind != "json_object" and not spec:
        raise GrammarError(f"an empty {kind} grammar")


def _short(message: str) -> str:
    """xgrammar's '[time] /project/cpp/file.cc:123: reason' -> 'reason'."""
    line = message.strip().splitlines()[0] if message.strip() else message
    return line.split(": ", 1)[1] if line.startswith("[") and ": " in line else line
