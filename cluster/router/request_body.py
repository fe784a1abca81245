"""Reading a request body safely: bounded size, strict JSON.

A body over `router.max_body_bytes` is refused with 413 from its Content-Length, or as
soon as the streamed bytes pass the bound, so it is never held whole. JSON that Python
would accept but no forward can use is refused with 400: `NaN` / `Infinity` literals,
floats that overflow to infinity (`1e999`), integers past Python's digit limit, and
nesting deep enough to exhaust the parser's recursion.
"""
from __future__ import annotations

import json
import math

from fastapi import Request

from cluster.router.errors import APIError, bad_request


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid number: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def parse_json(raw: bytes):
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise bad_request("the body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:      # JSONDecodeError is a ValueError
        raise bad_request(f"the body is not valid JSON: {e}") from None


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes "
                    "(router.max_body_bytes)", "invalid_request_error", code="body_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
