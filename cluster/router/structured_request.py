"""The request fields that constrain or shape the distribution: `response_format`, the `regex` /
`ebnf` extensions, tools that must be called, `logit_bias`. Each becomes SamplingParams fields
(`grammar_kind` / `grammar_spec`, `logit_bias`), or a 400 naming the field.

    response_format: {"type": "text"} | {"type": "json_object"}
                   | {"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}
    regex: "..."   ebnf: "..."        (extensions, as SGLang's; at most one constraint per request)

The spec is compiled here once, with the router's tokenizer, so a bad schema, regex or
grammar is the client's 400 and never a worker's failure (workers compile it again, cached).
"""
from __future__ import annotations

import json
import threading
from typing import Optional

from cluster.router.errors import bad_request
from cluster.router.tool_calls import ToolChoice, constraint_schema

_backends: dict[int, object] = {}
_backends_lock = threading.Lock()


def parse_response_format(body: dict) -> Optional[tuple[str, str, str]]:
    """(grammar_kind, grammar_spec, the field it came from), or None when the output is free."""
    found = []
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise bad_request('expected {"type": "text" | "json_object" | "json_schema", ...}', "response_format")
        kind = fmt["type"]
        if kind == "json_object":
            found.append(("json_object", "", "response_format"))
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("expected an object with a schema", "response_format.json_schema")
            found.append(("json_schema", json.dumps(schema), "response_format"))
        elif kind != "text":
            raise bad_request(f"{kind!r} is not one of text, json_object, json_schema", "response_format.type")
    for kind in ("regex", "ebnf"):
        value = body.get(kind)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise bad_request("expected a non-empty string", kind)
            found.append((kind, value, kind))
    if len(found) > 1:
        raise bad_request(f"at most one of response_format, regex, ebnf; got {', '.join(f[2] for f in found)}",
                          found[1][2])
    return found[0] if found else None


def grammar_fields(body: dict, functions: list[dict], choice: ToolChoice) -> tuple[dict, str]:
    """(SamplingParams kwargs, the field they came from) for the request's constraint (a tool
    call that must happen counts); ({}, "") when the output is free."""
    fmt = parse_response_format(body)
    schema = constraint_schema(functions, choice)
    if schema is not None:
        if fmt is not None:
            raise bad_request(f"tool_choice={choice.mode} already constrains the output", fmt[2])
        fmt = ("json_schema", json.dumps(schema), "tools")
    if fmt is None:
        return {}, ""
    return {"grammar_kind": fmt[0], "grammar_spec": fmt[1]}, fmt[2]


def check_grammar(tokenizer, kind: str, spec: str, field: str) -> None:
    """Compile once with the router's tokenizer: a bad spec is a 400 naming `field`."""
    from cluster.engine.grammar import GrammarBackend, GrammarError
    with _backends_lock:
        backend = _backends.get(id(tokenizer))
        if backend is None:
            backend = _backends[id(tokenizer)] = GrammarBackend(tokenizer, tokenizer.vocab_size)
    try:
        backend.compile(kind, spec)
    except GrammarError as e:
        raise bad_request(f"invalid {kind}: {e}", field) from None


def parse_logit_bias(body: dict) -> list:
    """OpenAI's {"token id": bias} -> [[token_id, bias], ...]; ids are checked against the vocabulary later."""
    bias = body.get("logit_bias")
    if bias is None:
        return []
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise bad_request("expected an object of at most 1024 token ids to biases", "logit_bias")
    pairs = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad_request(f"key {key!r} is not a token id", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad_request(f"bias for {key} must be a number in [-100, 100], got {value!r}", "logit_bias")
        pairs.append([int(key), float(value)])
    return pairs
