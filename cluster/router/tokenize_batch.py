"""Prompts that arrive together are tokenized together.

A burst of requests is parsed in one turn of the event loop; each request adds its prompt
here and awaits a future. At the end of the turn one job goes to the tokenize thread: it
renders the chat templates, encodes every text with one `encode_batch` per tokenizer (run
in parallel by the backend, without the GIL, where `encode` holds it) and hands all results
back with one wake-up of the loop. 256 requests arriving at once are a few executor round
trips, not 256 that each stall the loop while their encode holds the GIL.

A burst is parsed in one turn (uvicorn starts every request's task together), so a job also
leaves as soon as it holds `MAX_BATCH` prompts: the thread encodes them while the loop parses
the rest, instead of the whole burst's tokenizing starting only after its last request was
parsed.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from cluster.router.openai_request import ParsedRequest
from cluster.router.prepare import check_ids_present, prompt_text

MAX_BATCH = 32            # prompts per tokenize job; more wait for the end of the loop's turn


class TokenizeBatcher:
    def __init__(self, pool: Executor):
        self.pool = pool
        self._pending: list[tuple[ParsedRequest, object, asyncio.Future]] = []

    async def prompt_ids(self, parsed: ParsedRequest, tokenizer) -> list[int]:
        """The request's prompt token ids (a 400 when its chat template refuses it, or empty)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush, loop)              # after everything ready this turn
        self._pending.append((parsed, tokenizer, future))
        if len(self._pending) >= MAX_BATCH:
            self._flush(loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        if batch:                                          # (flushed early, at MAX_BATCH)
            self.pool.submit(_tokenize_all, loop, batch)


def _tokenize_all(loop: asyncio.AbstractEventLoop, batch: list) -> None:
    """On the tokenize thread: every prompt's ids or its exception, then one loop wake-up."""
    results: list = [None] * len(batch)
    texts: dict[int, list[tuple[int, str]]] = {}           # id(tokenizer) -> [(index, text)]
    for i, (parsed, tokenizer, _) in enumerate(batch):
        try:
            text = prompt_text(parsed, tokenizer)
        except Exception as e:                             # a 400 from the chat template
            results[i] = e
            continue
        if text is None:
            results[i] = list(parsed.prompt_ids)
        else:
            texts.setdefault(id(tokenizer), []).append((i, text))
    for group in texts.values():
        tokenizer = batch[group[0][0]][1]
        try:
            encoded = tokenizer.encode_batch([t for _, t in group])
        except Exception as e:
            encoded = [e] * len(group)
        for (i, _), ids in zip(group, encoded):
            results[i] = ids
    loop.call_soon_threadsafe(_resolve, batch, results)


def _resolve(batch: list, results: list) -> None:
    for (_, _, future), result in zip(batch, results):
        if future.done():                                  # its client went away meanwhile
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
            continue
        try:
            check_ids_present(result)
            future.set_result(result)
        except Exception as e:
            future.set_exception(e)
