"""LLM.generate finish rules, the shared stop checker, and the incremental detokenizer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.engine.llm import LLM
from cluster.engine.stop_checker import check_finish, trim_stop
from cluster.engine.tokenizer import IncrementalDetokenizer
from cluster.sampling_params import SamplingParams

PROMPT = "<|im_start|>user\nCount from one to ten in words, separated by commas.<|im_end|>\n<|im_start|>assistant\n"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def llm():
    return LLM(num_pages=256, page_size=16)


def test_max_tokens_gives_length_and_eos_gives_stop(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    long = llm.generate([PROMPT], SamplingParams(max_tokens=120))[0]
    assert long.finish_reason == "stop" and long.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in long.text
    ignored = llm.generate([PROMPT], SamplingParams(max_tokens=len(long.token_ids) + 3, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and ignored.token_ids[:len(long.token_ids)] == long.token_ids


def test_stop_string_trims_text_and_stop_token_ids_stop(llm):
    prompt = "Once upon a time, in a small village by the sea,"
    full = llm.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    word = full.text.split()[4]
    out = llm.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True, stop=[word]))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(word)]
    assert full.token_ids[:len(out.token_ids)] == out.token_ids
    stop_id = full.token_ids[5]
    out = llm.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]


def test_seeded_sampling_reproducible_and_logprobs_returned(llm):
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11, logprobs=True)
    a, b = llm.generate([PROMPT, PROMPT], [sp, sp])
    assert a.token_ids == b.token_ids and len(a.logprobs) == len(a.token_ids)
    assert all(lp <= 0 for lp in a.logprobs)


def test_token_id_prompts_and_mixed_batch(llm):
    ids = llm.tokenizer.encode(PROMPT)
    by_ids, by_text = llm.generate([ids, PROMPT], SamplingParams(max_tokens=6))
    assert by_ids.token_ids == by_text.token_ids and by_ids.prompt_token_ids == ids
    llm.runner.page_allocator.check_integrity(held=[])


def test_check_finish_rules():
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "".join(chr(96 + i) for i in ids))
    req = lambda out, **kw: SimpleNamespace(output_ids=out, sampling=SamplingParams(**kw),  # noqa: E731
                                            eos_token_ids=frozenset({2}))
    assert check_finish(req([5, 2], max_tokens=9), tok) == "stop"
    assert check_finish(req([5, 2], max_tokens=9, ignore_eos=True), tok) is None
    assert check_finish(req([5, 2], max_tokens=9, min_tokens=3), tok) is None
    assert check_finish(req([5, 7], max_tokens=9, stop_token_ids=[7]), tok) == "stop"
    assert check_finish(req([1, 2, 3], max_tokens=3, ignore_eos=True), tok) == "length"
    assert check_finish(req([8, 9, 10], max_tokens=9, stop=["hij"]), tok) == "stop"      # "hij"
    assert check_finish(req([8, 9, 11], max_tokens=9, stop=["hij"]), tok) is None
    assert trim_stop("one, two, three", [", t", "x"]) == "one"


def test_incremental_detokenizer_never_splits_utf8(llm):
    tok = llm.tokenizer
    text = "Café 日本語 🎉 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([t]) for t in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_held_back_for_an_incomplete_character_is_sent_when_the_request_finishes(llm):
    from cluster.router.completion import CompletionText
    tok = llm.tokenizer
    ids = tok.encode("ok 🎉")
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))
    text = CompletionText(IncrementalDetokenizer(tok), [])
    streamed = text.add(ids[:cut - 1], None, None).text
    streamed += text.add(ids[cut - 1:cut], None, "length").text
    assert streamed == tok.decode(ids[:cut]) and streamed.endswith("\ufffd")


def test_incremental_detokenizer_joining_context_free_pieces_equals_decoding_the_whole(llm):
    import random
    tok = llm.tokenizer
    rng = random.Random(0)
    special = sorted(tok.backend.get_added_tokens_decoder())
    for trial in range(50):                   # random ids: split characters, specials, plain pieces
        ids = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(tok.vocab_size)
               for _ in range(30)]
        detok, streamed, i = IncrementalDetokenizer(tok), "", 0
        while i < len(ids):
            n = rng.randint(1, 3)
            streamed += detok.add(ids[i:i + n])
            i += n
        assert streamed + detok.finish() == tok.decode(ids), trial
