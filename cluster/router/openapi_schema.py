"""OpenAPI request-body schemas of the two generation endpoints, served at /openapi.json.

The bodies are parsed by hand (`openai_request.py`, so every rejection has the OpenAI error
shape), which leaves FastAPI nothing to infer a schema from; these describe the accepted
fields for clients and for the HTTP fuzz test. The parser, not this schema, is the
authority: a body the schema allows may still get a 400 naming the field.
"""
from __future__ import annotations

_NUMBER = {"type": "number"}
_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_COMMON = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": _NUMBER, "top_p": _NUMBER, "top_k": {"type": "integer"},
    "min_tokens": {"type": "integer"}, "seed": {"type": "integer"},
    "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER, "repetition_penalty": _NUMBER,
    "stop": _STOP, "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
    "ignore_eos": {"type": "boolean"}, "stream": {"type": "boolean"},
    "stream_options": {"type": "object",
                       "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": "integer"},
    "logit_bias": {"type": "object", "additionalProperties": _NUMBER},
}
COMPLETION_BODY = {
    "type": "object", "required": ["prompt"],
    "properties": {**_COMMON,
                   "prompt": {"oneOf": [{"type": "string"},
                                        {"type": "array", "items": {"type": "integer"}}]},
                   "logprobs": {"type": "integer"}, "echo": {"type": "boolean"}},
}
_MESSAGE = {"type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string",
                                    "enum": ["system", "developer", "user", "assistant"]},
                           "content": {"type": "string"}}}
CHAT_BODY = {
    "type": "object", "required": ["messages"],
    "properties": {**_COMMON,
                   "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                   "max_completion_tokens": {"type": "integer", "minimum": 1},
                   "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer"}},
}


def request_body(schema: dict) -> dict:
    """`openapi_extra` for a route that reads its JSON body by hand."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}
