"""OpenAI request bodies -> `ParsedRequest`, or a 400 naming the field and the reason.

Bodies are validated by hand rather than by pydantic models so that every rejection has
the OpenAI error shape and names the offending parameter (FastAPI's 422 is never seen).
Unknown fields are ignored, as OpenAI-compatible servers do (`user`, `metadata`, ...).
`extra_body` fields arrive at the top level; the DLLM ones (`block_size`, `algorithm`,
`threshold`, `steps_per_block`) are only accepted for a model served by dllm workers.
Bounds of sampling and DLLM values are their types' (`SamplingParams`, `DllmParams`); here
only the JSON shapes and the OpenAI API's own limits (temperature <= 2, penalties in [-2, 2]).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from cluster.dllm_params import DllmParams
from cluster.router.errors import bad_request
from cluster.router.structured_request import grammar_fields, parse_logit_bias
from cluster.router.tool_calls import ToolChoice, parse_tools
from cluster.sampling_params import MAX_TOP_LOGPROBS, InvalidParam

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16             # choices per prompt
MAX_PROMPTS = 64       # prompts in one completions request
_MISSING = object()


@dataclass
class ParsedRequest:
    kind: str                                  # "completion" | "chat"
    model: Optional[str]
    prompt: Optional[str] = None               # completions: text prompt
    prompt_ids: Optional[list[int]] = None     # completions: token-id prompt
    more_prompts: list = field(default_factory=list)   # completions: prompts 2.. of a list (str or ids)
    n: int = 1                                 # choices per prompt
    echo: bool = False                         # completions: the prompt text before the answer
    functions: list = field(default_factory=list)      # chat tools (tool_calls.parse_tools)
    tool_choice: ToolChoice = ToolChoice("none")
    grammar_field: str = ""                    # the field the grammar came from (for 400s)
    messages: Optional[list[dict]] = None      # chat
    max_tokens: Optional[int] = None           # None: the server default
    sampling: dict = field(default_factory=dict)   # SamplingParams kwargs except max_tokens
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False                     # return the chosen token's logprob
    top_logprobs: int = 0                      # completions `logprobs=1`: chosen token as top-1
    dllm: dict = field(default_factory=dict)   # block_size / algorithm / threshold / steps


def _get(body: dict, name: str, kinds: tuple, default=None, nullable: bool = True):
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    is_bool = isinstance(value, bool)
    ok = isinstance(value, kinds) and (bool in kinds or not is_bool)
    if not ok:
        names = " or ".join("number" if k is float else k.__name__ for k in kinds)
        raise bad_request(f"expected {names}, got {type(value).__name__}", name)
    return float(value) if float in kinds and int not in kinds else value


def _number(body, name, default=None, lo=None, hi=None):
    value = _get(body, name, (int, float), default)
    if value is None:
        return None
    if lo is not None and value < lo:
        raise bad_request(f"must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise bad_request(f"must be <= {hi}, got {value}", name)
    return value


def _int(body, name, default=None, lo=None, hi=None):
    value = _get(body, name, (int,), default)
    if value is not None and lo is not None and value < lo:
        raise bad_request(f"must be >= {lo}, got {value}", name)
    if value is not None and hi is not None and value > hi:
        raise bad_request(f"must be <= {hi}, got {value}", name)
    return value


def _stop(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("expected a non-empty string or a list of non-empty strings", "stop")
    return list(stops)


def _token_ids(value, name) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise bad_request("expected a list of non-negative token ids", name)
    return value


def _common(body: dict, kind: str) -> ParsedRequest:
    model = _get(body, "model", (str,))
    n = _int(body, "n", 1, lo=1, hi=MAX_N)
    stream = bool(_get(body, "stream", (bool,), False))
    options = _get(body, "stream_options", (dict,), None)
    if options is not None and not stream:
        raise bad_request("only allowed when stream is true", "stream_options")
    include_usage = bool(_get(options or {}, "include_usage", (bool,), False))
    seed = _int(body, "seed")
    sampling = dict(
        temperature=_number(body, "temperature", 1.0, hi=2),
        top_p=_number(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0),
        min_tokens=_int(body, "min_tokens", 0),
        seed=seed,
        stop=_stop(body),
        stop_token_ids=_token_ids(body.get("stop_token_ids") or [], "stop_token_ids"),
        ignore_eos=bool(_get(body, "ignore_eos", (bool,), False)),
        presence_penalty=_number(body, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        logit_bias=parse_logit_bias(body),
    )
    parsed = ParsedRequest(kind=kind, model=model, sampling=sampling, stream=stream,
                           include_usage=include_usage, n=n)
    if kind == "chat":
        parsed.functions, parsed.tool_choice = parse_tools(body)
    grammar, parsed.grammar_field = grammar_fields(body, parsed.functions, parsed.tool_choice)
    sampling.update(grammar)
    parsed.dllm = _dllm(body)
    return parsed


def _dllm(body: dict) -> dict:
    """The DLLM overrides present in `body`, checked by DllmParams."""
    out = {k: v for k, v in (("block_size", _int(body, "block_size")),
                             ("algorithm", _get(body, "algorithm", (str,))),
                             ("threshold", _number(body, "threshold")),
                             ("steps_per_block", _int(body, "steps_per_block"))) if v is not None}
    try:
        if out:                 # NOTE: building the defaults checks every field: not for each request
            DllmParams().with_overrides(out)
    except InvalidParam as e:
        raise bad_request(e.reason, e.name) from None
    return out


def parse_completion(body: Any) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    parsed = _common(body, "completion")
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise bad_request("is required", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", "prompt")
        for i, p in enumerate(prompt[1:], 1):   # a batch: one choice (or n) per prompt
            if not p or not (isinstance(p, str) or _token_ids(p, f"prompt[{i}]")):
                raise bad_request("must not be empty", f"prompt[{i}]")
        parsed.more_prompts = list(prompt[1:])
        prompt = prompt[0]
    if isinstance(prompt, str):
        parsed.prompt = prompt
    elif isinstance(prompt, list) and prompt and not isinstance(prompt[0], (str, list)):
        parsed.prompt_ids = _token_ids(prompt, "prompt")
    else:
        raise bad_request("expected a non-empty string or a list of token ids", "prompt")
    if not (parsed.prompt or parsed.prompt_ids):
        raise bad_request("must not be empty", "prompt")
    parsed.max_tokens = _int(body, "max_tokens", lo=1)
    logprobs = _int(body, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
    parsed.logprobs = logprobs is not None
    parsed.top_logprobs = logprobs or 0
    parsed.sampling["top_logprobs"] = logprobs or 0
    parsed.echo = bool(_get(body, "echo", (bool,), False))
    parsed.sampling["prompt_logprobs"] = parsed.echo and parsed.logprobs
    best_of = _int(body, "best_of", parsed.n, lo=1)
    if best_of != parsed.n:
        raise bad_request(f"only best_of = n ({parsed.n}) is supported, got {best_of}", "best_of")
    if body.get("suffix"):
        raise bad_request("suffix is not supported", "suffix")
    return parsed


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request("only text content parts are supported",
                                  f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise bad_request("expected a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body: Any) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    parsed = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("expected a non-empty list of messages", "messages")
    parsed.messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request("expected an object", f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{role!r} is not one of {', '.join(CHAT_ROLES)}",
                              f"messages[{i}].role")
        message = {"role": role, "content": _message_text(m.get("content"), i)}
        calls = m.get("tool_calls")
        if role == "assistant" and calls is not None:   # earlier turns' calls, for the chat template
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      for c in calls):
                raise bad_request("expected a list of tool calls", f"messages[{i}].tool_calls")
            message["tool_calls"] = calls
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        parsed.messages.append(message)
    max_tokens = _int(body, "max_tokens", lo=1)
    parsed.max_tokens = _int(body, "max_completion_tokens", max_tokens, lo=1)
    parsed.logprobs = bool(_get(body, "logprobs", (bool,), False))
    top = _int(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
    if top and not parsed.logprobs:
        raise bad_request("needs logprobs: true", "top_logprobs")
    parsed.top_logprobs = parsed.sampling["top_logprobs"] = top
    return parsed
