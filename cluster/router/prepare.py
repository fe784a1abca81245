"""Tokenize and validate: from a parsed OpenAI request to checked token ids and SamplingParams.

Admission calls these in order: `check_prompt_size` (before any tokenizer work: megabytes
of text are refused by their length alone), `prompt_text` on the tokenize thread (renders the
chat template; tokenize_batch.py encodes a burst's texts together), then `sampling_for`, which builds the request's one
SamplingParams with the prompt length known (max_tokens defaults to what is left of the
context; completions to at most 16, OpenAI's legacy default), and `check_for_model`.
Every refusal is a 400 naming the parameter.
"""
from __future__ import annotations

import jinja2

from cluster.router.errors import bad_request
from cluster.router.openai_request import ParsedRequest
from cluster.sampling_params import InvalidParam, SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16             # OpenAI's legacy completions default
# parameters a DLLM worker does not implement: a clean 400 naming them
_NOT_FOR_DLLM = (("grammar_kind", "response_format"), ("logit_bias", "logit_bias"),
                 ("top_logprobs", "top_logprobs"), ("prompt_logprobs", "echo"))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    """The chat template's text; a model without one, or messages its template refuses, are a 400."""
    if tokenizer.chat_template is None:
        raise bad_request("this model has no chat template: use /v1/completions", "messages")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:   # the template's own checks (e.g. role order) are input errors
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from e


def check_prompt_size(parsed: ParsedRequest, tokenizer, max_model_len: int) -> None:
    """A prompt whose characters cannot fit in max_model_len tokens is refused before it is
    tokenized (which would cost seconds for megabytes of text)."""
    if parsed.kind == "chat":
        num_chars = sum(len(m["content"]) for m in parsed.messages)
    else:
        num_chars = len(parsed.prompt or "")
    limit = max_model_len * tokenizer.max_token_chars
    if num_chars > limit or len(parsed.prompt_ids or ()) > max_model_len:
        raise bad_request(f"the prompt is too long ({num_chars or len(parsed.prompt_ids)} "
                          f"characters or tokens) for this model's maximum context "
                          f"length of {max_model_len} tokens", "prompt")


def prompt_text(parsed: ParsedRequest, tokenizer) -> str | None:
    """What to encode: the rendered chat, the completion prompt, or None for given token ids.
    It is encoded without added special tokens, the tokenizer's default (no BOS for SmolLM2,
    as its HF tokenizer does); a chat template writes its own."""
    if parsed.kind == "chat":
        tools = [{"type": "function", "function": f} for f in parsed.functions]
        return render_chat(tokenizer, parsed.messages, True, **({"tools": tools} if tools else {}))
    return None if parsed.prompt_ids is not None else parsed.prompt


def check_ids_present(ids: list[int]) -> None:
    if not ids:
        raise bad_request("the prompt has no tokens", "prompt")


def check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param)


def sampling_for(parsed: ParsedRequest, num_prompt: int, max_model_len: int) -> SamplingParams:
    """The request's SamplingParams, built once; max_tokens bounded by the context left."""
    room = max_model_len - num_prompt
    if room < 1:
        raise bad_request(f"the prompt has {num_prompt} tokens; this model's maximum "
                          f"context length is {max_model_len} tokens", "prompt")
    max_tokens = parsed.max_tokens
    if max_tokens is None:
        max_tokens = min(room, COMPLETION_DEFAULT_MAX_TOKENS) if parsed.kind == "completion" else room
    elif num_prompt + max_tokens > max_model_len:
        raise bad_request(f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) "
                          f"exceeds this model's maximum context length of {max_model_len} "
                          "tokens", "max_tokens")
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=parsed.logprobs, **parsed.sampling)
    except InvalidParam as e:
        raise bad_request(e.reason, e.name) from None


def check_for_model(parsed: ParsedRequest, sampling: SamplingParams, input_ids: list[int], tokenizer,
                    route: str) -> None:
    """What only the model can judge: token ids in its vocabulary, top_k within it, and the
    parameters a DLLM model does not implement."""
    vocab = tokenizer.vocab_size                           # NOTE: ~13 us a call: once
    check_token_ids(input_ids, vocab, "prompt")
    check_token_ids(sampling.stop_token_ids, vocab, "stop_token_ids")
    check_token_ids([t for t, _ in sampling.logit_bias], vocab, "logit_bias")
    if route == "dllm":
        for name, param in _NOT_FOR_DLLM:
            if name == "top_logprobs" and parsed.kind == "completion":
                param = "logprobs"
            if getattr(sampling, name):
                raise bad_request("not supported by diffusion (dllm) models",
                                  parsed.grammar_field or param if name == "grammar_kind" else param)
    if sampling.top_k > vocab:
        raise bad_request(f"must be <= the vocabulary size {vocab}, got "
                          f"{sampling.top_k}", "top_k")
