"""The response of one HTTP request from its generations (n choices x prompts), whole or streamed.

Each generation streams on its own; a stream interleaves their chunks, each carrying its
choice `index`. Usage counts each prompt once however many choices it has. Chat outputs
become tool calls here: a constrained call (`required` / named) when the text is complete,
an `auto` call as soon as its block closes (`ToolCallStream`); the finish reason is then
`tool_calls`. Completions with `echo` begin with the prompt text.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Optional

from cluster.router.errors import APIError, error_body
from cluster.router.event_stream import ChunkWire
from cluster.router.steady_stream import SteadyStream
from cluster.router.openai_response import ResponseWriter, sse
from cluster.router.tool_calls import ToolCallStream, calls_from_constrained, parse_tool_calls

log = logging.getLogger("pdcluster.router")


def _usage(gens) -> tuple[int, int]:
    prompts = {g.prompt_index: g.num_prompt for g in gens}
    return sum(prompts.values()), sum(g.text.num_tokens for g in gens)


def _echo(gen) -> str:
    p = gen.parsed
    if p is None or not p.echo:
        return ""
    return p.prompt if p.prompt is not None else gen.writer.tokenizer.decode(gen.st.input_ids, skip_special_tokens=False)


def _tool_calls(gen, text: str) -> tuple[Optional[str], list]:
    """(content, calls) of a finished chat text under the request's tools."""
    p = gen.parsed
    if p is None or p.kind != "chat" or not p.functions or p.tool_choice.mode == "none":
        return text, []
    if p.tool_choice.mode == "auto":
        content, calls = parse_tool_calls(text, p.functions)
    else:
        calls = calls_from_constrained(text, p.tool_choice)
        content = "" if calls else text
    return (content or None) if calls else text, calls


async def whole_response(service, gens, disconnected) -> Optional[dict]:
    """The non-streamed body, or None when the client went away."""
    async def collect(gen):
        texts, logprobs, finish = [], [], None
        async for deltas in service.deltas(gen, disconnected):
            for delta in deltas:
                texts.append(delta.text)
                if delta.prompt_logprobs is not None and _echo(gen):
                    logprobs.append(gen.writer.format_prompt_logprobs(gen.st.input_ids, delta.prompt_logprobs))
                logprobs.append(gen.writer.format_logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs))
                finish = delta.finish_reason
        return "".join(texts), ResponseWriter.merge_logprobs(logprobs), finish

    results = await asyncio.gather(*(collect(g) for g in gens))
    if any(finish is None for _, _, finish in results):
        return None
    choices = []
    for gen, (text, logprobs, finish) in zip(gens, results):
        content, calls = _tool_calls(gen, text)
        if calls:
            finish = "tool_calls"
        choices.append(gen.writer.choice(_echo(gen) + content if content is not None else None, finish, logprobs,
                                         [c.to_openai() for c in calls] or None))
    return gens[0].writer.body(choices, *_usage(gens))


async def stream_choices(service, gens, wire: Callable[[], Optional[ChunkWire]] = lambda: None
                         ) -> AsyncIterator[bytes]:
    """SSE chunks of every generation, interleaved; one error event (no [DONE]) on failure.

    What arrived together leaves in one write: one event per token, one send. Any failure
    while streaming, expected (APIError) or not, ends the stream with an error event: once
    the response has started, an exception escaping here would make the server cut the
    connection with no word to the client. `wire()`: the response's ChunkWire, which a single
    choice's steady tokens take once the stream is under way (`_choice_chunks`)."""
    try:
        if len(gens) == 1:                     # no interleaving: no pump task, no queue
            async for chunks in _choice_chunks(service, gens[0], wire):
                yield b"".join(chunks)
        else:
            async for data in _interleaved(service, gens):
                yield data
    except APIError as e:
        yield sse(e.body())
        return
    except Exception as e:                     # a bug must not look like a network cut
        log.exception("stream of %s failed", gens[0].st.rid)
        yield sse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error", 500))
        return
    w = gens[0].writer
    if w.include_usage:
        yield sse(w.usage_chunk(*_usage(gens)))
    yield sse("[DONE]")


async def _interleaved(service, gens) -> AsyncIterator[bytes]:
    """n > 1 choices or several prompts: each streams on its own task into one queue."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen):
        try:
            async for chunks in _choice_chunks(service, gen):
                await queue.put(chunks)
        except Exception as e:                 # raised again below, in the response's task
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield b"".join(item)
    finally:                                   # NOTE: a closed stream aborts every choice
        for t in tasks:
            t.cancel()


async def _choice_chunks(service, gen, wire: Callable[[], Optional[ChunkWire]] = lambda: None
                         ) -> AsyncIterator[list[bytes]]:
    """The SSE events of one generation, a list per batch of deltas that arrived together.
    With a `wire`, once every event is a plain text delta (no tools, logprobs or echo left:
    from the first token on where there are none), plain tokens may bypass this generator: the
    mailbox hands them to its `SteadyStream` (steady_stream.py) while it waits here (mailbox.py)."""
    w, p = gen.writer, gen.parsed
    tools = p is not None and p.kind == "chat" and p.functions and p.tool_choice.mode != "none"
    auto = ToolCallStream(p.functions) if tools and p.tool_choice.mode == "auto" else None
    held: list[str] = []                       # a constrained call: sent whole at the end
    num_calls = 0
    deltas = service.deltas(gen)

    def go_steady() -> None:
        if (gen.mailbox.steady is None and not tools and not w.logprobs and not echo
                and (chunk_wire := wire()) is not None):
            gen.mailbox.steady = SteadyStream(service, gen, chunk_wire)
    try:
        echo = _echo(gen)
        if w.kind == "chat":                   # the role chunk, at once
            yield [w.event("", None, None, first=True)]
        elif echo and not w.logprobs:
            yield [w.event(echo, None)]
            echo = ""
        # NOTE: from the first token on: in a burst, a stream's coroutine is woken behind the
        # admission of every request queued on the loop; its first token need not wait for that
        go_steady()
        async for batch in deltas:
            out: list[dict] = []
            for delta in batch:
                if echo:                       # with logprobs: the prompt's arrive with the first token
                    prompt_lp = (w.format_prompt_logprobs(gen.st.input_ids, delta.prompt_logprobs)
                                 if delta.prompt_logprobs is not None else None)
                    out.append(w.event(echo, None, prompt_lp))
                    echo = ""
                lp = w.format_logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs)
                text, calls, finish = delta.text, [], delta.finish_reason
                if auto is not None:
                    text, calls = auto.feed(text)
                    if finish is not None:
                        rest, more = auto.finish()
                        text, calls = text + rest, calls + more
                elif tools:
                    held.append(text)
                    text = ""
                    if finish is not None:
                        whole = "".join(held)
                        calls = calls_from_constrained(whole, p.tool_choice)
                        text = "" if calls else whole
                if calls:
                    indexed = list(enumerate(calls, num_calls))
                    num_calls += len(calls)
                    out.append(w.event(text, None, lp, tool_calls=indexed))
                    text, lp = "", None
                if finish is not None and num_calls:
                    finish = "tool_calls"
                if text or lp is not None or finish is not None:
                    out.append(w.event(text, finish, lp))
            if out:
                yield out
            go_steady()
    finally:
        await deltas.aclose()
