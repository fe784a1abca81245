"""OpenAI response bodies: completions and chat, whole or as SSE chunks, with logprobs."""
from __future__ import annotations

import json
import time
from json.encoder import encode_basestring_ascii
from typing import Optional


_compact = json.JSONEncoder(separators=(",", ":")).encode   # one encoder: json.dumps with
                                                            # separators builds one per call
_MARK = "\x00text\x00"                                    # stands for the text in a template


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else _compact(payload)
    return f"data: {data}\n\n".encode()


def usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


class ResponseWriter:
    """Builds the bodies of one request; `kind` is "completion" or "chat"."""

    def __init__(self, kind: str, rid: str, model: str, tokenizer, logprobs: bool,
                 top_logprobs: int, include_usage: bool, index: int = 0):
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + rid
        self.created = int(time.time())
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.include_usage = include_usage
        self.text_offset = 0
        self.index = index                # the choice this writer's chunks belong to
        self._template: Optional[tuple[bytes, bytes]] = None

    # logprobs
    def format_logprobs(self, token_ids: list[int], logprobs: Optional[list[float]],
                        top: Optional[list] = None):
        """`top`: per token, [[token_id, logprob], ...] best first (None: not computed)."""
        if not self.logprobs:
            return None
        values = logprobs if logprobs is not None else [None] * len(token_ids)
        tokens = [self._piece(t) for t in token_ids]
        tops = top if top is not None else [None] * len(token_ids)
        if self.kind == "chat":
            return {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                                 "top_logprobs": [{"token": self._piece(i), "logprob": v,
                                                   "bytes": list(self._piece(i).encode("utf-8"))}
                                                  for i, v in (pairs or [])[:self.top_logprobs]]}
                                for tok, lp, pairs in zip(tokens, values, tops)]}
        offsets = []
        for tok in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(tok)
        top = None
        if self.top_logprobs:   # without computed top (dllm), the chosen token stands as the top-1
            top = [{self._piece(i): v for i, v in pairs[:self.top_logprobs]} if pairs else {tok: lp}
                   for tok, lp, pairs in zip(tokens, values, tops)]
        return {"tokens": tokens, "token_logprobs": list(values), "top_logprobs": top,
                "text_offset": offsets}

    @staticmethod
    def merge_logprobs(parts: list):
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if "content" in parts[0]:
            return {"content": [c for p in parts for c in p["content"]]}
        merged = {k: [] for k in ("tokens", "token_logprobs", "text_offset")}
        top = [] if parts[0]["top_logprobs"] is not None else None
        for p in parts:
            for k in merged:
                merged[k] += p[k]
            if top is not None:
                top += p["top_logprobs"]
        return {**merged, "top_logprobs": top}

    def format_prompt_logprobs(self, prompt_ids: list[int], logprobs: list[float]):
        """Completions `echo` with `logprobs`: the prompt's tokens first (the first has no logprob;
        its top_logprobs entry is the token itself, as the engine computes only the prompt's own)."""
        values = [None] + list(logprobs)
        tokens = [self._piece(t) for t in prompt_ids]
        offsets = []
        for tok in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(tok)
        top = [None] + [{tok: lp} for tok, lp in zip(tokens[1:], logprobs)] if self.top_logprobs else None
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # whole responses
    def choice(self, text: Optional[str], finish_reason: Optional[str], logprobs,
               tool_calls: Optional[list] = None) -> dict:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return {"index": self.index, "message": message, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def body(self, choices: list[dict], num_prompt: int, num_completion: int) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(num_prompt, num_completion)}

    # stream chunks
    def chunk(self, text: str, finish_reason: Optional[str], logprobs=None,
              first: bool = False, tool_calls: Optional[list] = None) -> dict:
        """`tool_calls`: [(index, ToolCall)] sent whole in this chunk."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or (finish_reason is None and not tool_calls) else {})
            if tool_calls:
                delta["tool_calls"] = [{"index": i, **call.to_openai()} for i, call in tool_calls]
            choice = {"index": self.index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": self.index, "text": text, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            obj = "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return body

    def event(self, text: str, finish_reason: Optional[str], logprobs=None,
              first: bool = False, tool_calls: Optional[list] = None) -> bytes:
        """`chunk` as one SSE event. The common case, a text delta with no finish and no
        logprobs, is the request's template with the JSON-escaped text put in: the same bytes
        as encoding the chunk, without building and walking a dict per token."""
        if finish_reason is not None or logprobs is not None or first or tool_calls:
            return sse(self.chunk(text, finish_reason, logprobs, first, tool_calls))
        return self.text_event(text)

    def text_event(self, text: str) -> bytes:
        """The event of a plain text delta (no finish, no logprobs)."""
        head, tail = self.text_template()
        return head + encode_basestring_ascii(text).encode() + tail

    def text_template(self) -> tuple[bytes, bytes]:
        """(head, tail): a plain text delta's event is head + its JSON-escaped text + tail."""
        if self._template is None:
            head, _, tail = sse(self.chunk(_MARK, None)).partition(encode_basestring_ascii(_MARK).encode())
            self._template = head, tail
        return self._template

    def usage_chunk(self, num_prompt: int, num_completion: int) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [], "usage": usage(num_prompt, num_completion)}
