"""One streamed OpenAI-API request, timed at every token: what every `pdcluster bench` load
(and the benchmarks under `benchmarks/`) measures with."""
from __future__ import annotations

import json
import time

from cluster.bench.raw_stream import RawStreams, SseSplitter

PROMPT_WORDS = ("alpha", "beta", "gamma", "delta", "omega")


def cycled_prompt(i: int, num_words: int) -> str:
    """Request i's prompt: `num_words` words cycled from a start that rotates per request."""
    return " ".join(PROMPT_WORDS[(i + k) % len(PROMPT_WORDS)] for k in range(num_words))


def api_client(args, **limits):
    """An httpx.AsyncClient on `args.url` (with or without its /v1) and `args.api_key`;
    `limits` are httpx.Limits' arguments."""
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"

    class ApiClient(httpx.AsyncClient):
        async def __aexit__(self, *exc) -> None:
            raw = getattr(self, "_pdcluster_raw_streams", None)
            if raw is not None:
                raw.close()
            await super().__aexit__(*exc)
    return ApiClient(base_url=base, headers=headers, limits=httpx.Limits(**limits), timeout=httpx.Timeout(600.0))


async def resolve_model(client, args) -> None:
    """`args.model` defaults to the first model the server lists."""
    if args.model is None:
        args.model = (await client.get("/models")).json()["data"][0]["id"]


async def one_request(client, args, prompt: str) -> dict:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    return await stream_timed(client, "/completions", body, lambda choice: choice["text"])


async def stream_timed(client, path: str, body: dict, text_of) -> dict:
    """Stream one request, timing every chunk that carries text (`text_of(choice)`). An http://
    server is read over the client's own keep-alive connections (raw_stream.py), others through httpx."""
    start = time.perf_counter()
    arrivals, text, num_tokens, num_prompt, error, rid = [], [], 0, 0, None, None

    def on_data(data: bytes) -> None:
        nonlocal error, num_tokens, num_prompt
        event = json.loads(data)
        if "error" in event:
            error = event["error"].get("message")
        elif event.get("usage"):
            num_tokens = event["usage"]["completion_tokens"]
            num_prompt = event["usage"]["prompt_tokens"]
        elif event["choices"] and (piece := text_of(event["choices"][0])):
            arrivals.append(time.perf_counter())
            text.append(piece)
    try:
        if client.base_url.scheme == "http":
            status, headers, answer = await raw_streams(client).post(client.base_url.path.rstrip("/") + path,
                                                                      body, on_data)
            rid = headers.get("x-request-id")
            if status != 200:
                return {"error": f"HTTP {status}: {answer[:200]!r}"}
        else:
            async with client.stream("POST", path, json=body) as resp:
                rid = resp.headers.get("x-request-id")     # the router's id: GET /debug/requests/{rid}
                if resp.status_code != 200:
                    return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
                async for data in sse_data(resp):
                    on_data(data)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error or not arrivals:
        return {"error": error or "no tokens"}
    itl = [(b - a) for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] - start, "itl": itl, "e2e": end - start,
            "num_tokens": num_tokens or len(arrivals), "prompt_tokens": num_prompt,
            "start": start, "arrivals": arrivals, "text": "".join(text), "request_id": rid}


def raw_streams(client) -> RawStreams:
    """The keep-alive connections that go with an httpx client (made on first use, closed with it)."""
    streams = getattr(client, "_pdcluster_raw_streams", None)
    if streams is None:
        url = client.base_url
        streams = RawStreams(url.host, url.port or 80, client.headers.get("authorization"))
        client._pdcluster_raw_streams = streams
    return streams


async def sse_data(resp):
    """The payload of each `data: ` line of an event stream but `[DONE]`, as it arrives. Splits the
    response's bytes itself: httpx's line iterator (a text decoder and a line decoder per chunk)
    cost the client about as much CPU per token as the router spends, on the same cores."""
    sse = SseSplitter()
    async for chunk in resp.aiter_bytes():
        for payload in sse.feed(chunk):
            yield payload
    for payload in sse.end():
        yield payload


def relative_to(results: list[dict], start: float) -> None:
    """Times of successful results become seconds since the run's `start`."""
    for r in results:
        if "error" not in r:
            r["arrivals"] = [t - start for t in r["arrivals"]]
            r["start"] -= start
