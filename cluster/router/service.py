"""RouterService: from a parsed OpenAI request to a stream of text deltas.

It resolves the model, has the request tokenized and validated (`prepare.py`), admits it
through the Dispatcher and turns dispatcher events into `TextDelta`s, observing TTFT /
ITL / e2e latency and counting outcomes on the way.
Tokenizers are the only model state the router loads (never weights):
`cluster.engine.loader.load_tokenizer(name, path, load_format)`, one per distinct path.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable, Optional

from cluster.config import ClusterConfig
from cluster.roles import served_model
from cluster.router.completion import CompletionText, TextDelta
from cluster.router.control_answers import ControlAnswers
from cluster.router.dispatcher import Dispatcher
from cluster.router.dispatcher_link import DispatcherLink
from cluster.router.errors import APIError, bad_request, overloaded
from cluster.router.metrics import RouterMetrics, WorkerStatsCollector
from cluster.router.openai_request import ParsedRequest
from cluster.router.openai_response import ResponseWriter
from cluster.router.prepare import check_for_model, check_prompt_size, sampling_for
from cluster.router.tokenize_batch import TokenizeBatcher
from cluster.router.mailbox import Mailbox
from cluster.router.request_state import FailedEvent, RequestState, TokensEvent, coalesced
from cluster.router.planner import Planner
from cluster.router.slo import SloWindow, request_tpot
from cluster.router.tracing import RequestTracing

log = logging.getLogger("pdcluster.router")
DISCONNECT_POLL_S = 1.0        # a whole (non-streamed) response checks its client this often
MAX_EVENTS_BEHIND = 8          # more events waiting than this: sent as one delta
TOKENIZE_THREADS = 2            # tokenizing releases the GIL; more threads than cores buy nothing


@dataclass(slots=True)
class Generation:
    st: RequestState
    mailbox: Mailbox
    text: CompletionText
    writer: ResponseWriter
    num_prompt: int
    arrival: float
    is_done: bool = False
    index: int = 0                    # the choice's index in the response
    prompt_index: int = 0             # which prompt of a list it answers (usage counts each once)
    parsed: Optional[ParsedRequest] = None
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    num_output: int = 0


class RouterService:
    """`dispatcher` is the Dispatcher itself (one router process, or the dispatcher's process
    behind front ends), or a front end's DispatcherLink to it: then tracing, the SLO window
    and every answer about workers live with the dispatcher, and the link forwards to them."""

    def __init__(self, cfg: ClusterConfig, dispatcher: Dispatcher | DispatcherLink):
        self.cfg, self.dispatcher = cfg, dispatcher
        self.metrics = RouterMetrics(lambda: dispatcher.num_in_flight)
        self.planner = None
        if isinstance(dispatcher, DispatcherLink):
            self.tracing, self.slo, self.ask = dispatcher.tracing, dispatcher.slo, dispatcher.ask
            dispatcher.attach(self.metrics)
        else:
            self.metrics.add_collector(WorkerStatsCollector(
                dispatcher.worker_stats, dispatcher.restarts, dispatcher.rejected_frames))
            self.metrics.add_collector(dispatcher.role_switches)
            self.tracing = RequestTracing(cfg.tracing.otlp_endpoint, self.metrics.observe_phase)
            self.slo = SloWindow(cfg.slo) if cfg.slo.is_set else None
            if self.slo:
                self.metrics.add_collector(self.slo)
            self.planner = Planner(cfg, dispatcher, self.slo).start() if cfg.planner.enabled else None
            self.ask = ControlAnswers(self).ask
        self.is_draining = False
        self.frontend_id: Optional[str] = None           # a front end's name (its responses carry it)
        self._tokenizers: dict[str, object] = {}
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")
        self._tokenize = TokenizeBatcher(self._tokenize_pool)

    # models
    def configured_dllm(self) -> dict[str, str]:
        """Served dllm model name -> weights path ("" = the main model's)."""
        return {served_model(self.cfg, g): g.path for g in self.cfg.groups if g.role == "dllm"}

    def served_models(self) -> list[str]:
        dllm = set(self.configured_dllm()) | set(self.dispatcher.dllm_models())
        return [self.cfg.model.name] + sorted(dllm - {self.cfg.model.name})

    def route_of(self, model: Optional[str]) -> tuple[str, str]:
        name = model or self.cfg.model.name
        if name == self.cfg.model.name:
            return name, "pd"
        if name in self.served_models():
            return name, "dllm"
        raise APIError(404, f"The model `{name}` does not exist. Served models: "
                       f"{', '.join(self.served_models())}", "invalid_request_error",
                       code="model_not_found")

    def tokenizer_for(self, model: str):
        path = self.configured_dllm().get(model, "") or self.cfg.model.path
        if path not in self._tokenizers:
            from cluster.engine.model_files import load_tokenizer
            m = self.cfg.model
            self._tokenizers[path] = load_tokenizer(m.name if path == m.path else model, path,
                                                    m.load_format)
        return self._tokenizers[path]

    def load_tokenizers(self) -> None:
        for model in self.served_models():
            self.tokenizer_for(model).piece_texts   # built now, not by the first request

    # admission
    async def start_choices(self, parsed: ParsedRequest,
                            traceparent: Optional[str] = None) -> list[Generation]:
        """One generation per (prompt, choice): index = prompt_index * n + j; choice j seeds
        `seed + j`. A prompt's n choices go to one pair as one `generate`: one prefill, one KV
        transfer, decode forks them (`Dispatcher.submit_group`)."""
        prompts = [(parsed.prompt, parsed.prompt_ids)] + [
            (p, None) if isinstance(p, str) else (None, p) for p in parsed.more_prompts]
        gens: list[Generation] = []
        try:
            for p, (text, ids) in enumerate(prompts):
                group: list[Generation] = []
                for j in range(parsed.n):
                    seed = parsed.sampling.get("seed")
                    sub = replace(parsed, prompt=text, prompt_ids=ids, more_prompts=[], n=1,
                                  sampling={**parsed.sampling, "seed": None if seed is None else seed + j})
                    gen = await self.start(sub, traceparent, submit=parsed.n == 1)
                    gen.index = gen.writer.index = len(gens)
                    gen.prompt_index = p
                    gens.append(gen)
                    group.append(gen)
                if parsed.n > 1:
                    await self._submit([g.st for g in group])
        except BaseException:
            for gen in gens:          # all or nothing: the client gets the error alone
                gen.is_done = True
                self.dispatcher.abort(gen.st, "a sibling choice was rejected")
            raise
        return gens

    async def start(self, parsed: ParsedRequest, traceparent: Optional[str] = None,
                    submit: bool = True) -> Generation:
        """One generation, dispatched unless `submit` is False (the caller submits a group)."""
        arrival = time.time()
        if self.is_draining:
            self.metrics.count_outcome("rejected")
            raise overloaded("the server is shutting down", retry_after=5)
        model, route = self.route_of(parsed.model)
        if parsed.dllm and route != "dllm":
            raise bad_request(f"{', '.join(parsed.dllm)} only apply to dllm models "
                              f"({', '.join(self.served_models()[1:]) or 'none served'})")
        tokenizer = self.tokenizer_for(model)
        max_len = self.cfg.model.max_model_len
        check_prompt_size(parsed, tokenizer, max_len)
        # NOTE: off the event loop, and batched with the requests that arrived with it:
        # tokenizing a long prompt, or a burst of them, would stall every client's stream
        loop = asyncio.get_running_loop()
        input_ids = await self._tokenize.prompt_ids(parsed, tokenizer)
        sampling = sampling_for(parsed, len(input_ids), max_len)
        check_for_model(parsed, sampling, input_ids, tokenizer, route)
        if sampling.grammar_kind:
            from cluster.router.structured_request import check_grammar
            await loop.run_in_executor(self._tokenize_pool, check_grammar, tokenizer, sampling.grammar_kind,
                                       sampling.grammar_spec, parsed.grammar_field)
        rid = uuid.uuid4().hex
        mailbox = Mailbox(loop)
        st = RequestState(rid=rid, model=model, route=route, input_ids=input_ids,
                          sampling=sampling, dllm=dict(parsed.dllm), sink=mailbox)
        writer = ResponseWriter(parsed.kind, rid, model, tokenizer, parsed.logprobs,
                                parsed.top_logprobs, parsed.include_usage)
        from cluster.engine.tokenizer import IncrementalDetokenizer
        text = CompletionText(IncrementalDetokenizer(tokenizer), list(sampling.stop))
        gen = Generation(st, mailbox, text, writer, len(input_ids), time.monotonic(), parsed=parsed)
        st.trace = self.tracing.begin(rid, model, route, arrival, traceparent)
        if submit:
            await self._submit([st])
        return gen

    async def _submit(self, sts: list[RequestState]) -> None:
        try:
            await self.dispatcher.admit(sts)
        except APIError as e:
            if e.status == 503:
                self.metrics.count_outcome("rejected")
            for st in sts:
                self.tracing.end(st.trace, "rejected", error=e.message)
            raise

    # events -> text
    async def deltas(self, gen: Generation,
                     disconnected: Optional[Callable[[], Awaitable[bool]]] = None
                     ) -> AsyncIterator[list[TextDelta]]:
        """The text deltas of every event that arrived since the last list, one delta per
        event (each token leaves when it arrived), until the finishing one; raises APIError
        when the request fails. A backlog beyond MAX_EVENTS_BEHIND (the client or this loop
        is slower than the stream) leaves as one delta: one detokenize, one chunk."""
        try:
            while True:
                events = await gen.mailbox.take(DISCONNECT_POLL_S if disconnected is not None else None)
                if not events:
                    if disconnected is not None and await disconnected():
                        return
                    continue
                if len(events) > MAX_EVENTS_BEHIND:
                    events = coalesced(events)
                now = time.monotonic()
                num_tokens = sum(len(ev.token_ids) for ev in events if isinstance(ev, TokensEvent))
                if num_tokens:
                    gen.num_output += num_tokens
                    if gen.last_token_at is None:
                        gen.first_token_at = now
                        self.metrics.observe(self.metrics.ttft, now - gen.arrival)
                    else:
                        self.metrics.observe(self.metrics.itl, (now - gen.last_token_at) / num_tokens,
                                             times=num_tokens)
                    gen.last_token_at = now
                out: list[TextDelta] = []
                for ev in events:
                    if isinstance(ev, FailedEvent):
                        if out:                            # the tokens before the failure first
                            yield out
                        gen.is_done = True
                        outcome = "timeout" if ev.status == 504 else "error"
                        self.metrics.count_outcome(outcome)
                        self.tracing.end(gen.st.trace, outcome, error=ev.message)
                        raise APIError(ev.status, ev.message, ev.type, code=ev.status)
                    delta = gen.text.add(ev.token_ids, ev.logprobs, ev.finish_reason)
                    delta.top_logprobs, delta.prompt_logprobs = ev.top_logprobs, ev.prompt_logprobs
                    out.append(delta)
                    if ev.finish_reason is not None:
                        gen.is_done = True
                        self.metrics.observe(self.metrics.e2e, now - gen.arrival)
                        self.metrics.count_outcome("success")
                        if self.slo:
                            first = gen.first_token_at or now
                            self.slo.observe(first - gen.arrival, request_tpot(first, now, gen.num_output))
                        self.tracing.end(gen.st.trace, "success", ev.finish_reason)
                        break
                yield out
                if gen.is_done:
                    return
        finally:
            if not gen.is_done:
                gen.is_done = True
                self.metrics.count_outcome("aborted")
                self.tracing.end(gen.st.trace, "aborted", error="client disconnected")
                self.dispatcher.abort(gen.st, "client disconnected")

    # shutdown
    async def drain(self, seconds: float) -> None:
        """Stop admitting (503), then wait up to `seconds` for in-flight requests."""
        self.is_draining = True
        deadline = time.monotonic() + seconds
        while self.dispatcher.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drain done: %d request(s) still in flight", self.dispatcher.num_in_flight)
