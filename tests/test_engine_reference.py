"""The engine against transformers loading the SAME GGUF file (float32): logits, greedy text, tokenizer.

The engine runs its reference path, `cpu_weights="float32"` (the GGUF dequantized as transformers
does); the packed native weights are compared with this path in test_quant_linear.py."""
from __future__ import annotations

import warnings

import pytest
import torch

from cluster.engine.llm import LLM
from cluster.sampling_params import SamplingParams
from tests.engine_fixtures import hf_gguf_location, prefill_input

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
]
CHATS = [
    [{"role": "user", "content": "Give me three tips for staying healthy."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash table is."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
]
TOKENIZER_TEXTS = [
    "Hello world!", "  leading spaces and\ttabs\nnew lines\n\n", "Numbers 12345 and 3.14159, year 2024.",
    "Unicode: café, naïve, 日本語, emoji 🎉🚀", "<|im_start|>user\nhi<|im_end|>\n", "don't won't I'm we'll",
    "code: x = [i**2 for i in range(10)]  # squares",
]
NUM_GREEDY = 32

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = hf_gguf_location()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def llm():
    return LLM(num_pages=512, page_size=16, cpu_weights="float32")


def _prompts(llm):
    return PLAIN + [llm.tokenizer.apply_chat_template(m) for m in CHATS]


def test_tokenizer_ids_match_transformers(hf, llm):
    tok, _ = hf
    for text in TOKENIZER_TEXTS:
        assert llm.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False), text
        ids = tok.encode(text, add_special_tokens=False)
        assert llm.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True), text


def test_chat_template_matches_transformers(hf, llm):
    tok, _ = hf
    for messages in CHATS:
        for gen in (True, False):
            ours = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            ref = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == ref


def test_prefill_logits_match_transformers(hf, llm):
    _, model = hf
    runner = llm.runner
    for prompt in _prompts(llm):
        ids = llm.tokenizer.encode(prompt)
        pages = runner.page_allocator.allocate(-(-len(ids) // runner.page_size))
        try:
            ours = runner.forward(prefill_input(ids, pages, return_logits=True)).logits
        finally:
            runner.page_allocator.free(pages)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_greedy_continuations_match_transformers(hf, llm):
    """NUM_GREEDY tokens per prompt, token for token (EOS masked on both sides via min tokens)."""
    _, model = hf
    prompts = _prompts(llm)
    sp = SamplingParams(max_tokens=NUM_GREEDY, min_tokens=NUM_GREEDY)
    ours = llm.generate(prompts, sp)
    near_ties = []
    for prompt, out in zip(prompts, ours):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=NUM_GREEDY, min_new_tokens=NUM_GREEDY,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
        ref_ids = ref.sequences[0, len(ids):].tolist()
        assert len(out.token_ids) == NUM_GREEDY and out.finish_reason == "length"
        if out.token_ids != ref_ids:
            step = next(i for i, (a, b) in enumerate(zip(out.token_ids, ref_ids)) if a != b)
            top2 = ref.scores[step][0].topk(2).values
            gap = float(top2[0] - top2[1])
            # only a near tie in the reference may flip; anything else is a bug
            assert gap < 1e-3, f"diverged at step {step} with reference top-2 gap {gap}: {prompt!r}"
            near_ties.append((prompt, step, gap))
    if near_ties:   # accepted, but reported
        warnings.warn(f"greedy divergences at reference near ties (prompt, step, gap): {near_ties}")
