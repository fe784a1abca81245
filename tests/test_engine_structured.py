"""Offline engine: grammar-constrained outputs (xgrammar), logit_bias and top logprobs."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from cluster.engine.grammar import GrammarError
from cluster.engine.llm import LLM
from cluster.engine.sampler import sample
from cluster.sampling_params import SamplingParams
from tests.engine_fixtures import prefill_input

pytestmark = pytest.mark.usefixtures("single_thread")

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
               "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}},
    "nested_enum": {"type": "object", "additionalProperties": False, "required": ["city", "weather"],
                    "properties": {
                        "city": {"type": "object", "additionalProperties": False, "required": ["name", "country"],
                                 "properties": {"name": {"type": "string", "maxLength": 12},
                                                "country": {"enum": ["FR", "DE", "US"]}}},
                        "weather": {"enum": ["sunny", "rainy", "cloudy"]}}},
    "array": {"type": "object", "additionalProperties": False, "required": ["colors"],
              "properties": {"colors": {"type": "array", "minItems": 1, "maxItems": 3,
                                        "items": {"enum": ["red", "green", "blue"]}}}},
}


@pytest.fixture(scope="module")
def llm():
    return LLM(num_pages=256, page_size=16, cpu_weights="float32")   # the reference path (test_engine_reference.py)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_parses_and_validates(llm, name):
    schema = SCHEMAS[name]
    sp = SamplingParams(max_tokens=48, grammar_kind="json_schema", grammar_spec=json.dumps(schema))
    out = llm.generate([CHAT.format("Describe something as JSON.")], sp)[0]
    assert out.finish_reason == "stop", out
    jsonschema.validate(json.loads(out.text), schema)


def test_json_object_regex_and_ebnf_constrain_the_text(llm):
    prompt = CHAT.format("Give me an email address.")
    obj = llm.generate([prompt], SamplingParams(max_tokens=40, grammar_kind="json_object"))[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)
    rx = r"[a-z]{1,8}@[a-z]{1,8}\.com"
    mail = llm.generate([prompt], SamplingParams(max_tokens=30, grammar_kind="regex", grammar_spec=rx))[0]
    assert mail.finish_reason == "stop" and re.fullmatch(rx, mail.text), mail.text
    yes_no = llm.generate([CHAT.format("Is the sky green?")],
                          SamplingParams(max_tokens=8, grammar_kind="ebnf", grammar_spec='root ::= "yes" | "no"'))[0]
    assert yes_no.text in ("yes", "no")


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(max_tokens=10)
    prompt = CHAT.format("Say hello.")
    alone = llm.generate([prompt], free)[0]
    constrained = SamplingParams(max_tokens=10, grammar_kind="regex", grammar_spec="(ha)+!")
    both = llm.generate([prompt, prompt], [free, constrained])
    assert both[0].token_ids == alone.token_ids
    assert re.fullmatch(r"(ha)+!?", both[1].text), both[1].text


def test_bad_specs_raise_grammar_error(llm):
    for kind, spec in [("json_schema", '{"type": "strin"}'), ("regex", "([a-"), ("ebnf", "root ::= ")]:
        with pytest.raises(GrammarError):
            llm.grammar_backend.compile(kind, spec)


def test_matcher_replay_equals_stepwise_acceptance(llm):
    """The handoff carries the spec and the accepted tokens; a replayed matcher allows the same next tokens."""
    import xgrammar as xgr
    spec = json.dumps(SCHEMAS["person"])
    ids = llm.tokenizer.encode('{"name": "Al')
    stepwise = llm.grammar_backend.matcher("json_schema", spec)
    for t in ids:
        assert stepwise.accept(t)
    replayed = llm.grammar_backend.matcher("json_schema", spec, accepted=ids)
    masks = xgr.allocate_token_bitmask(2, llm.grammar_backend.vocab_size)
    stepwise.fill(masks, 0)
    replayed.fill(masks, 1)
    assert torch.equal(masks[0], masks[1])


def test_logit_bias_bans_and_forces_tokens(llm):
    prompt = CHAT.format("Count to three.")
    base = llm.generate([prompt], SamplingParams(max_tokens=3))[0]
    banned = llm.generate([prompt], SamplingParams(max_tokens=3, logit_bias=[[base.token_ids[0], -100]]))[0]
    assert banned.token_ids[0] != base.token_ids[0]
    forced_id = llm.tokenizer.encode(" banana")[0]
    forced = llm.generate([prompt], SamplingParams(max_tokens=3, logit_bias=[[forced_id, 100]]))[0]
    assert forced.token_ids == [forced_id] * 3


def test_top_logprobs_are_sorted_and_head_is_greedy_choice(llm):
    sp = SamplingParams(max_tokens=5, logprobs=True, top_logprobs=5)
    out = llm.generate([CHAT.format("Name a fruit.")], sp)[0]
    assert len(out.top_logprobs) == len(out.token_ids)
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        values = [v for _, v in top]
        assert len(top) == 5 and values == sorted(values, reverse=True)
        assert top[0][0] == tok and abs(top[0][1] - lp) < 1e-5


def test_sampler_top_logprobs_match_log_softmax_after_bias():
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))
    sps = [SamplingParams(logprobs=True, top_logprobs=4, logit_bias=[[3, 5.0]]), SamplingParams(logprobs=True)]
    ids, chosen, (top_ids, top_lps) = sample(logits, sps, [], [], [], [])
    processed = logits.clone()
    processed[0, 3] += 5.0
    ref = torch.log_softmax(processed, -1)
    ref_values, ref_ids = ref.topk(4, dim=-1)
    assert top_ids[0].tolist() == ref_ids[0].tolist() and int(ids[0]) == 3
    torch.testing.assert_close(top_lps[0], ref_values[0])
    torch.testing.assert_close(chosen, ref.gather(1, ids[:, None])[:, 0])


def test_prompt_logprobs_match_a_full_forward_and_survive_chunking(llm):
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=True))[0]
    assert len(out.prompt_logprobs) == len(ids) - 1
    # the full forward's logits equal transformers' on the same GGUF (test_engine_reference.py)
    runner = llm.runner
    pages = runner.page_allocator.allocate(-(-len(ids) // runner.page_size))
    try:
        logits = runner.forward(prefill_input(ids, pages, return_logits=True)).logits
    finally:
        runner.page_allocator.free(pages)
    ref = torch.log_softmax(logits.float(), -1)
    want = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs), want, atol=2e-3, rtol=0)
    chunked = LLM.__new__(LLM)
    chunked.__dict__.update(llm.__dict__)
    chunked.max_prefill_tokens = 5                     # the prompt spans several forwards
    again = chunked.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=True))[0]
    torch.testing.assert_close(torch.tensor(again.prompt_logprobs), torch.tensor(out.prompt_logprobs),
                               atol=1e-4, rtol=0)
