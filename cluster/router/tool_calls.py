"""Tool calls: the `tools` / `tool_choice` request fields, the schema that enforces a call, and
parsing the model's calls out of its text (whole or streamed).

- `none`: tools are shown to the chat template, the output is plain text.
- `required` / a named function: the output is constrained (structured outputs) by a JSON
  schema built from the functions' parameters, so even a small model returns a valid call.
  Named: the text is the arguments object itself. Required: the text is a JSON array of
  `{"name": ..., "parameters": {...}}`, at least one, each name one of the tools (vLLM's form).
- `auto`: free text, parsed for the forms chat templates teach: Hermes / Qwen
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in the text, and
  Llama-3's whole-message JSON `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`, several separated by `;`), which only counts when the name is a declared tool.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from cluster.router.errors import bad_request

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
TOOL_CHOICE_MODES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolChoice:
    mode: str                 # none | auto | required | named
    name: str = ""            # the function, when named


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str            # a JSON object as text, as OpenAI sends it
    id: str = ""

    def to_openai(self) -> dict:
        return {"id": self.id or "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(body: dict) -> tuple[list[dict], ToolChoice]:
    """(function definitions, choice) from a chat body; [] and none when there are no tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return [], ToolChoice("none")
    if not isinstance(tools, list):
        raise bad_request("expected a list of tools", "tools")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad_request('expected {"type": "function", "function": {...}}', f"tools[{i}]")
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request("expected a non-empty string", f"tools[{i}].function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request("expected a JSON schema object", f"tools[{i}].function.parameters")
        functions.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad_request("function names must be unique", "tools")
    if choice is None:
        return functions, ToolChoice("auto")
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_MODES:
            raise bad_request(f"{choice!r} is not one of {', '.join(TOOL_CHOICE_MODES)} or a named function",
                              "tool_choice")
        return functions, ToolChoice(choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
        raise bad_request('expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                          "tool_choice")
    if name not in names:
        raise bad_request(f"{name!r} is not one of the tools ({', '.join(names)})", "tool_choice")
    return functions, ToolChoice("named", name)


def constraint_schema(functions: list[dict], choice: ToolChoice) -> Optional[dict]:
    """The JSON schema the output must follow, or None when the output is free."""
    if choice.mode == "named":
        return next(f["parameters"] for f in functions if f["name"] == choice.name)
    if choice.mode != "required":
        return None
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                 "properties": {"name": {"const": f["name"]}, "parameters": f["parameters"]}} for f in functions]
    return {"type": "array", "minItems": 1, "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}


def calls_from_constrained(text: str, choice: ToolChoice) -> list[ToolCall]:
    """The calls in a `required` / named output (valid by construction unless cut by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []                                   # cut short: the text goes back as content
    if choice.mode == "named":
        return [ToolCall(choice.name, _dumps(value))]
    return [ToolCall(c["name"], _dumps(c.get("parameters", {}))) for c in value if isinstance(c, dict)]


def parse_tool_calls(text: str, functions: list[dict]) -> tuple[str, list[ToolCall]]:
    """`auto`: (content left over, calls) from the model's whole text."""
    calls = _llama3_calls(text, functions)
    if calls:
        return "", calls
    content, calls, rest = [], [], text
    while HERMES_OPEN in rest:
        before, _, after = rest.partition(HERMES_OPEN)
        body, closed, rest = after.partition(HERMES_CLOSE)
        call = _call_from_json(body)
        if call is None:                            # not a call after all: keep the text
            content.append(before + HERMES_OPEN + body + (HERMES_CLOSE if closed else ""))
            continue
        content.append(before)
        calls.append(call)
    content.append(rest)
    joined = "".join(content)
    return (joined.strip() if calls else joined), calls


def _llama3_calls(text: str, functions: list[dict]) -> list[ToolCall]:
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return []
    names = {f["name"] for f in functions}
    calls = []
    for part in _split_json_objects(body):
        call = _call_from_json(part)
        if call is None or call.name not in names:
            return []
        calls.append(call)
    return calls


def _split_json_objects(body: str) -> list[str]:
    """'{..}; {..}' -> ['{..}', '{..}'] (a ';' inside a string does not split)."""
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            _, end = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            return [body]                           # let the caller fail on it
        parts.append(body[i:end])
        i = end
        while i < len(body) and body[i] in " \n\t;":
            i += 1
    return parts


def _call_from_json(text: str) -> Optional[ToolCall]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):                       # some models send arguments as a JSON string
        return ToolCall(value["name"], args)
    return ToolCall(value["name"], _dumps(args))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class ToolCallStream:
    """Streaming `auto`: text in, (content delta, finished calls) out, never half a call.

    Content streams at once, except a tail that could be the start of `<tool_call>` and,
    when the message opens with `{` or `<|python_tag|>` (a possible Llama-3 call), the
    whole message, which is decided at the end. A call is sent whole, once its block closes.
    """

    def __init__(self, functions: list[dict]):
        self.functions = functions
        self.buffer = ""              # text not yet sent or parsed
        self.is_llama3 = None         # decided on the first non-blank character
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        if self.is_llama3 is None and self.buffer.strip():
            head = self.buffer.lstrip()
            self.is_llama3 = head.startswith("{") or head.startswith(PYTHON_TAG[:len(head)])
        if self.is_llama3 is not False:
            return "", []
        content, calls = [], []
        while True:
            start = self.buffer.find(HERMES_OPEN)
            if start < 0:
                keep = _partial_suffix(self.buffer, HERMES_OPEN)
                content.append(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            end = self.buffer.find(HERMES_CLOSE, start)
            if end < 0:
                content.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
                break
            call = _call_from_json(self.buffer[start + len(HERMES_OPEN):end])
            block_end = end + len(HERMES_CLOSE)
            if call is None:
                content.append(self.buffer[:block_end])
            else:
                content.append(self.buffer[:start])
                calls.append(call)
            self.buffer = self.buffer[block_end:]
        self.num_calls += len(calls)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: whatever is held back, parsed as a whole."""
        rest, self.buffer = self.buffer, ""
        content, calls = parse_tool_calls(rest, self.functions) if rest else ("", [])   # (EOS before a close tag too)
        self.num_calls += len(calls)
        return (content if calls else rest), calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
