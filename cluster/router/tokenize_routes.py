"""`POST /tokenize`, `POST /detokenize` and `GET /v1/models/{id}` (vLLM's shapes).

    POST /tokenize    {"model"?, "prompt": str, "add_special_tokens"?: bool}
                   or {"model"?, "messages": [...], "add_generation_prompt"?: bool}
                   -> {"count", "max_model_len", "tokens": [ids], "token_strs"?: [str]}
    POST /detokenize  {"model"?, "tokens": [ids]} -> {"prompt": str}
    GET  /v1/models/{id} -> the model object, or 404 naming the served models

Tokenizing runs on the router's tokenize threads, never on the event loop.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from fastapi import FastAPI, Request

from cluster.router.errors import APIError, bad_request
from cluster.router.prepare import render_chat


def model_card(name: str, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "pdcluster", "max_model_len": max_model_len}


def add_tokenize_routes(app: FastAPI, service, authorize: Callable[[Request], None],
                        read_json: Callable[[Request], Awaitable]) -> None:
    max_len = service.cfg.model.max_model_len

    async def body_and_tokenizer(request: Request):
        authorize(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad_request("expected a string", "model")
        name, _ = service.route_of(model)
        return body, service.tokenizer_for(name)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(service._tokenize_pool, fn, *args)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body, tokenizer = await body_and_tokenizer(request)
        if "messages" in body:
            from cluster.router.openai_request import parse_chat
            messages = parse_chat({"messages": body["messages"]}).messages
            add_gen = body.get("add_generation_prompt", True)
            if not isinstance(add_gen, bool):
                raise bad_request("expected a boolean", "add_generation_prompt")
            text = await off_loop(render_chat, tokenizer, messages, add_gen)
            ids = await off_loop(tokenizer.encode, text, False)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad_request("expected a string (or send messages)", "prompt")
            if len(prompt) > max_len * tokenizer.max_token_chars:
                raise bad_request(f"the prompt is too long for a maximum context of {max_len} tokens", "prompt")
            special = body.get("add_special_tokens", False)
            if not isinstance(special, bool):
                raise bad_request("expected a boolean", "add_special_tokens")
            ids = await off_loop(tokenizer.encode, prompt, special)
        out = {"count": len(ids), "max_model_len": max_len, "tokens": ids}
        if body.get("return_token_strs"):
            out["token_strs"] = [tokenizer.id_to_token(t) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body, tokenizer = await body_and_tokenizer(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise bad_request("expected a list of token ids", "tokens")
        bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})", "tokens")
        return {"prompt": await off_loop(lambda: tokenizer.decode(ids, skip_special_tokens=False))}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id not in service.served_models():
            raise APIError(404, f"The model `{model_id}` does not exist. Served models: "
                           f"{', '.join(service.served_models())}", "invalid_request_error", code="model_not_found")
        return model_card(model_id, max_len)
