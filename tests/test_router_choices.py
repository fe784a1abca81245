"""Router response assembly against scripted workers: n choices and prompt lists (indexes,
usage), echo, tool calls (whole and streamed), top logprobs formatting."""
from __future__ import annotations

import json

import pytest

from cluster.wire import protocol
from tests.router_harness import CHAT, COMPLETION, MODEL, echo_reply, pd_pair, sse_events


def test_n_choices_stream_with_their_index_and_usage_counts_the_prompt_once(router):
    tok = router.service.tokenizer_for(MODEL)
    _, decode = pd_pair(router, echo_reply(tok.encode(" one two")))
    body = {**COMPLETION, "n": 2, "seed": 5, "stream": True, "stream_options": {"include_usage": True}}
    with router.http.stream("POST", "/v1/completions", json=body) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    texts = {}
    for e in events[:-2]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: " one two", 1: " one two"}
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] == len(tok.encode("Hello")) and usage["completion_tokens"] == 4
    gens = [m for m in decode.received if isinstance(m, protocol.Generate)]
    assert len(gens) == 1 and len(gens[0].siblings) == 1   # one prefill: choice 1 rides along
    assert gens[0].sampling.seed == 5 and gens[0].sampling.for_choice(1).seed == 6   # choice j: seed + j


def test_prompt_list_with_echo_answers_each_prompt_in_order(router):
    tok = router.service.tokenizer_for(MODEL)
    pd_pair(router, echo_reply(tok.encode(" end")))
    r = router.http.post("/v1/completions", json={**COMPLETION, "prompt": ["Hello", "Bye now"], "echo": True}).json()
    assert [(c["index"], c["text"]) for c in r["choices"]] == [(0, "Hello end"), (1, "Bye now end")]
    assert r["usage"]["prompt_tokens"] == len(tok.encode("Hello")) + len(tok.encode("Bye now"))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_required_tool_call_whole_and_streamed(router):
    tok = router.service.tokenizer_for(MODEL)
    _, decode = pd_pair(router, echo_reply(tok.encode('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'),
                                           "stop"))
    body = {**CHAT, "max_tokens": 64, "tools": TOOLS, "tool_choice": "required"}
    r = router.http.post("/v1/chat/completions", json=body).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    grammar = next(m.sampling for m in decode.received if isinstance(m, protocol.Generate))
    assert grammar.grammar_kind == "json_schema" and "get_weather" in grammar.grammar_spec
    with router.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        events = sse_events(resp)
    calls = [tc for e in events[:-1] for c in e["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert [(tc["index"], tc["function"]["name"], tc["function"]["arguments"]) for tc in calls] == \
        [(0, "get_weather", call["function"]["arguments"])]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls" and events[-1] == "[DONE]"


def test_top_logprobs_are_formatted_per_token(router):
    tok = router.service.tokenizer_for(MODEL)
    ids = tok.encode(" a b")

    def reply(worker, gen):
        for i, t in enumerate(ids):
            top = [[t, -0.1], [t + 1, -2.5]]
            worker.client.send(protocol.Tokens(worker_id=worker.worker_id, items=[protocol.TokensItem(
                gen.rid, [t], "length" if i == len(ids) - 1 else None, None, [-0.1], [top])]))
    pd_pair(router, reply)
    r = router.http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tok.decode([t]) for t in ids]
    assert all([t["logprob"] for t in c["top_logprobs"]] == [-0.1, -2.5] for c in content)
    assert all(c["top_logprobs"][0]["token"] == c["token"] for c in content)


def test_streamed_echo_with_logprobs_sends_the_prompt_and_its_logprobs_first(router):
    tok = router.service.tokenizer_for(MODEL)
    prompt_ids, out = tok.encode("Hello there"), tok.encode(" friend")

    def reply(worker, gen):
        assert gen.sampling.prompt_logprobs
        worker.client.send(protocol.Tokens(worker_id=worker.worker_id, items=[protocol.TokensItem(
            gen.rid, out, "length", None, [-0.3] * len(out), prompt_logprobs=[-1.5] * (len(prompt_ids) - 1))]))
    pd_pair(router, reply)
    body = {**COMPLETION, "prompt": "Hello there", "echo": True, "logprobs": 0, "stream": True}
    with router.http.stream("POST", "/v1/completions", json=body) as resp:
        events = sse_events(resp)
    first = events[0]["choices"][0]
    assert first["text"] == "Hello there"
    assert first["logprobs"]["tokens"] == [tok.decode([t]) for t in prompt_ids]
    assert first["logprobs"]["token_logprobs"] == [None] + [-1.5] * (len(prompt_ids) - 1)
    rest = [c for e in events[1:-1] for c in e["choices"]]
    assert "".join(c["text"] for c in rest) == " friend"
    assert rest[0]["logprobs"]["text_offset"][0] == len("Hello there")


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_templated_sse_event_is_byte_identical_to_encoding_the_chunk(kind, include_usage):
    from cluster.router.openai_response import ResponseWriter, sse
    w = ResponseWriter(kind, "abc", "m", None, False, 0, include_usage, index=2)
    for text in ["", "plain", ' "quoted" \\ back\nslash\t', "Café 日本語 🎉 \x00\x1f"]:
        assert w.event(text, None) == sse(w.chunk(text, None))
    assert w.event("end", "stop") == sse(w.chunk("end", "stop"))
