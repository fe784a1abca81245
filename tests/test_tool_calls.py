"""Tool calls: request validation, the enforcing schema, parsing whole and streamed outputs."""
from __future__ import annotations

import json

import jsonschema
import pytest

from cluster.router.errors import APIError
from cluster.router.tool_calls import (ToolCallStream, ToolChoice, calls_from_constrained, constraint_schema,
                                       parse_tool_calls, parse_tools)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
FUNCTIONS, _ = parse_tools({"tools": [WEATHER, TIME]})


def test_tool_choice_forms_and_errors_name_the_field():
    assert parse_tools({})[1] == ToolChoice("none")
    assert parse_tools({"tools": [WEATHER]})[1] == ToolChoice("auto")
    assert parse_tools({"tools": [WEATHER], "tool_choice": "required"})[1] == ToolChoice("required")
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert parse_tools({"tools": [WEATHER], "tool_choice": named})[1] == ToolChoice("named", "get_weather")
    bad = [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
           ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
           ({"tools": [{"type": "function"}]}, "tools[0]"),
           ({"tools": [WEATHER, WEATHER]}, "tools"),
           ({"tool_choice": "required"}, "tool_choice")]
    for body, param in bad:
        with pytest.raises(APIError) as e:
            parse_tools(body)
        assert e.value.status == 400 and e.value.message.startswith(param + ":")


def test_required_schema_accepts_calls_and_rejects_unknown_functions():
    schema = constraint_schema(FUNCTIONS, ToolChoice("required"))
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "other", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    calls = calls_from_constrained('[{"name": "get_weather", "parameters": {"city": "Paris"}}]', ToolChoice("required"))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    named = calls_from_constrained('{"city": "Oslo"}', ToolChoice("named", "get_weather"))
    assert named[0].name == "get_weather" and json.loads(named[0].arguments) == {"city": "Oslo"}


def test_auto_parses_hermes_and_llama3_forms():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, FUNCTIONS)
    assert content == "Let me check." and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Rome"}
    llama = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "get_time", "parameters": {}}'
    content, calls = parse_tool_calls(llama, FUNCTIONS)
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    plain = '{"name": "Bob", "age": 3}'                   # JSON that is not a declared tool: content
    assert parse_tool_calls(plain, FUNCTIONS) == (plain, [])


@pytest.mark.parametrize("text", [
    'Sure! <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call> done',
    '{"name": "get_weather", "parameters": {"city": "Lima"}}',
    'no tools here, just <tool_ text and a < sign',
    '<tool_call>{"name": "get_time", "arguments": {}}',   # EOS before the closing tag
])
def test_streamed_pieces_reassemble_to_the_whole_parse(text):
    whole_content, whole_calls = parse_tool_calls(text, FUNCTIONS)
    stream, content, calls = ToolCallStream(FUNCTIONS), "", []
    for i in range(0, len(text), 3):
        c, k = stream.feed(text[i:i + 3])
        content, calls = content + c, calls + k
    c, k = stream.finish()
    content, calls = content + c, calls + k
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert content.strip() == whole_content.strip()
