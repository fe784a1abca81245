"""Router endpoints without workers: /tokenize, /detokenize, /v1/models/{id}."""
from __future__ import annotations

from tests.router_harness import assert_error


def test_tokenize_then_detokenize_round_trips(router):
    tok = router.service.tokenizer_for(router.cfg.model.name)   # loaded here: the first load can take seconds
    got = router.http.post("/tokenize", json={"prompt": "Hello, world!", "return_token_strs": True}).json()
    assert got["tokens"] == tok.encode("Hello, world!") and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == router.cfg.model.max_model_len and len(got["token_strs"]) == got["count"]
    back = router.http.post("/detokenize", json={"tokens": got["tokens"]}).json()
    assert back == {"prompt": "Hello, world!"}


def test_tokenize_messages_uses_the_chat_template(router):
    msgs = [{"role": "user", "content": "Hi"}]
    tok = router.service.tokenizer_for(router.cfg.model.name)
    got = router.http.post("/tokenize", json={"messages": msgs}).json()
    assert got["tokens"] == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))


def test_tokenize_errors_name_the_field(router):
    assert_error(router.http.post("/tokenize", json={"prompt": 3}), 400, "prompt")
    assert_error(router.http.post("/detokenize", json={"tokens": [1, "a"]}), 400, "tokens")
    assert_error(router.http.post("/detokenize", json={"tokens": [10 ** 9]}), 400, "tokens")
    assert_error(router.http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404, "nope")


def test_model_by_id(router):
    name = router.cfg.model.name
    card = router.http.get(f"/v1/models/{name}").json()
    assert card["id"] == name and card["object"] == "model"
    assert_error(router.http.get("/v1/models/gpt-9"), 404, "gpt-9")


def test_chat_without_a_usable_template_is_400_not_500(router):
    """A model with no chat template (a bare tokenizer.json), or a template that refuses the
    messages (raise_exception), is the client's error, on chat completions and /tokenize alike."""
    tok = router.service.tokenizer_for(router.cfg.model.name)
    chat = {"model": router.cfg.model.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    saved = tok.chat_template, tok._template
    try:
        tok.chat_template, tok._template = None, None
        assert_error(router.http.post("/v1/chat/completions", json=chat), 400, "no chat template")
        assert_error(router.http.post("/tokenize", json={"messages": chat["messages"]}), 400, "no chat template")
        tok.chat_template, tok._template = "{{ raise_exception('roles must alternate') }}", None
        assert_error(router.http.post("/v1/chat/completions", json=chat), 400, "roles must alternate")
    finally:
        tok.chat_template, tok._template = saved


def test_a_burst_is_tokenized_in_jobs_that_leave_while_it_is_parsed(router):
    """A burst does not queue behind itself: prompts added in one turn of the event loop are
    encoded by few jobs on the tokenize thread, each leaving once it holds MAX_BATCH prompts
    (not at the end of the turn), each prompt getting its own ids (or its own 400)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from cluster.router.errors import APIError
    from dataclasses import replace

    from cluster.router.openai_request import parse_completion
    from cluster.router.tokenize_batch import MAX_BATCH, TokenizeBatcher
    tok = router.service.tokenizer_for(router.cfg.model.name)
    jobs = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, *args):
            jobs.append(len(args[1]))
            return super().submit(fn, *args)

    async def burst():
        batcher = TokenizeBatcher(CountingPool(1))
        prompts = [parse_completion({"prompt": f"request number {i}"}) for i in range(2 * MAX_BATCH)]
        refused = replace(parse_completion({"prompt": "x"}), prompt="")    # no tokens: a 400
        return await asyncio.gather(*(batcher.prompt_ids(p, tok) for p in prompts + [refused]),
                                    return_exceptions=True)
    results = asyncio.run(burst())
    assert jobs == [MAX_BATCH, MAX_BATCH, 1]
    assert results[:-1] == [tok.encode(f"request number {i}") for i in range(2 * MAX_BATCH)]
    assert isinstance(results[-1], APIError) and results[-1].status == 400
