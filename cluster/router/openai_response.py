"""OpenAI response bodies: completions and chat, whole or as SSE chunks, with logprobs."""
from __future__ import annotations

import json
import time
from typing import Optional


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


class ResponseWriter:
    """Builds the bodies of one request; `kind` is "completion" or "chat"."""

    def __init__(self, kind: str, rid: str, model: str, tokenizer, logprobs: bool,
                 top_logprobs: int, include_usage: bool):
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + rid
        self.created = int(time.time())
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.include_usage = include_usage
        self.text_offset = 0

    # logprobs
    def format_logprobs(self, token_ids: list[int], logprobs: Optional[list[float]]):
        if not self.logprobs:
            return None
        values = logprobs if logprobs is not None else [None] * len(token_ids)
        tokens = [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
        if self.kind == "chat":
            return {"content": [{"token": tok, "logprob": lp,
                                 "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
                                for tok, lp in zip(tokens, values)]}
        offsets = []
        for tok in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(tok)
        top = [{tok: lp} for tok, lp in zip(tokens, values)] if self.top_logprobs else None
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

    # whole responses
    def full(self, text: str, finish_reason: Optional[str], logprobs, num_prompt: int,
             num_completion: int) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(num_prompt, num_completion)}

    # stream chunks
    def chunk(self, text: str, finish_reason: Optional[str], logprobs=None,
              first: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or finish_reason is None else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            obj = "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, num_prompt: int, num_completion: int) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [], "usage": usage(num_prompt, num_completion)}
