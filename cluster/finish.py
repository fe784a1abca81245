"""When a request is done: EOS, stop token ids, stop strings, max_tokens.

Workers own stopping (so a finished request frees its pages at once); the router only
trims the matched stop string from the text.
"""
from __future__ import annotations

from typing import Optional

from cluster.schedule_batch import Req

STOP_STRING_TAIL_TOKENS = 8   # extra tokens decoded beyond the longest stop string


def check_finish(req: Req, tokenizer) -> Optional[str]:
    """Finish reason after the last appended output token, or None to go on."""
    sp = req.sampling
    if not req.output_ids:
        return None
    last = req.output_ids[-1]
    if req.num_output >= sp.min_tokens:
        if not sp.ignore_eos and last in req.eos_token_ids:
            return "stop"
        if last in sp.stop_token_ids:
            return "stop"
        if sp.stop and tokenizer is not None and matched_stop(req, tokenizer) is not None:
            return "stop"
    if req.num_output >= sp.max_tokens:
        return "length"
    return None


def matched_stop(req: Req, tokenizer) -> Optional[str]:
    """The stop string that the output text now ends past, if any."""
    longest = max(len(s) for s in req.sampling.stop)
    tail_ids = req.output_ids[-(longest + STOP_STRING_TAIL_TOKENS):]
    tail = tokenizer.decode(tail_ids, skip_special_tokens=True)
    new_piece = tokenizer.decode(req.output_ids[-1:], skip_special_tokens=True)
    # only a match that involves the newest token is new; older ones were checked before
    window = tail[-(longest + len(new_piece)):] if new_piece else tail[-longest:]
    for s in req.sampling.stop:
        if s and s in window:
            return s
    return None
