"""When a request is done: EOS, stop token ids, stop strings, max_tokens.

Works on any request-like object with `output_ids`, `sampling` (SamplingParams) and
`eos_token_ids`, so the offline LLM and the workers share it. Call it after each appended
token: a stop string is only looked for in the text the newest token touched.
"""
from __future__ import annotations

from typing import Optional

TAIL_TOKENS = 8   # tokens decoded beyond the longest stop string (a token is at least one byte)


def check_finish(req, tokenizer) -> Optional[str]:
    """"stop", "length" or None after the last appended output token."""
    sp, out = req.sampling, req.output_ids
    if not out:
        return None
    if len(out) >= sp.min_tokens:   # below min_tokens only the length limit ends a request
        last = out[-1]
        if last in sp.stop_token_ids or (not sp.ignore_eos and last in req.eos_token_ids):
            return "stop"
        if sp.stop and tokenizer is not None and matched_stop(out, sp.stop, tokenizer) is not None:
            return "stop"
    if len(out) >= sp.max_tokens:
        return "length"
    return None


def matched_stop(output_ids: list[int], stops: list[str], tokenizer) -> Optional[str]:
    """The stop string that appears in the text touched by the newest token, if any."""
    longest = max(len(s.encode()) for s in stops)
    tail = tokenizer.decode(output_ids[-(longest + TAIL_TOKENS):], skip_special_tokens=True)
    before = tokenizer.decode(output_ids[-(longest + TAIL_TOKENS):-1], skip_special_tokens=True)
    # only text from (newest piece - longest) on can hold a new match
    common = len(before) if tail.startswith(before) else 0
    window = tail[max(0, common - longest):]
    for s in stops:
        if s and s in window:
            return s
    return None


def trim_stop(text: str, stops: list[str]) -> str:
    """Cut `text` at the earliest stop string (the stop string itself is not returned)."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return text if cut < 0 else text[:cut]
