"""FastAPI routes of the router: OpenAI API, /health, /metrics and the launcher's endpoints.

Internal endpoints (`/internal/...`) answer local clients only (loopback, or the router's
own bound address when it listens on one interface) and, when the router was
started with PDCLUSTER_ROUTER_TOKEN in its environment (the launcher always sets it), only
requests carrying it in `X-PDCluster-Token`:
- `GET  /internal/workers`             registered, live workers (the launcher waits on it)
- `POST /internal/workers/{id}/exit`   {"reason": ...}: the launcher saw the process exit
"""
from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.router.admin import add_admin_routes
from cluster.router.choices import stream_choices, whole_response
from cluster.router.errors import APIError, bad_request, error_body
from cluster.router.event_stream import RAW_SEND, EventStreamResponse
from cluster.router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cluster.router.openai_request import parse_chat, parse_completion
from cluster.router.openapi_schema import CHAT_BODY, COMPLETION_BODY, request_body
from cluster.router.request_body import parse_json, read_body
from cluster.router.service import RouterService
from cluster.router.tokenize_routes import add_tokenize_routes, model_card

log = logging.getLogger("pdcluster.router")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FRONTEND_HEADER = "x-pdcluster-frontend"     # which front end answered (api_servers > 1)


class RouterApp(FastAPI):
    """FastAPI that leaves the server's own `send` in the scope for `EventStreamResponse`, and
    serves the generation endpoints (`direct_routes`: (method, path) -> endpoint) without the
    middleware and routing stack, a fifth of a streamed request's CPU: the same endpoint
    function, the same error bodies as the exception handlers give (APIError, anything else
    a 500). Every other request, and these paths under other methods, go through FastAPI."""

    direct_routes: dict = {}

    async def __call__(self, scope, receive, send) -> None:
        scope[RAW_SEND] = send
        endpoint = self.direct_routes.get((scope.get("method"), scope.get("path")))
        if endpoint is None or scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except APIError as e:
            response = e.response()
        except Exception as e:
            response = internal_error(request, e)
        await response(scope, receive, send)


def internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error", 500),
                        status_code=500)


def create_app(service: RouterService, internal_token: str = "") -> FastAPI:
    app = RouterApp(title="pdcluster", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.service = service
    cfg = service.cfg

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        return bad_request(str(e.errors()[:3])).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind, e.status_code),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception):
        return internal_error(request, e)

    api_key = cfg.router.api_key.encode()

    def authorize(request: Request) -> None:
        if not api_key:
            return
        # NOTE: compared as raw header bytes (latin-1 is how HTTP carries them): a non-ASCII
        # header is a wrong key, not a TypeError from compare_digest on str
        given = request.headers.get("authorization", "").encode("latin-1")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), api_key):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                           "<key>'", "invalid_request_error", code="invalid_api_key")

    def internal_only(request: Request) -> None:
        host = request.client.host if request.client else ""
        server = (request.scope.get("server") or ("",))[0]
        token = request.headers.get("x-pdcluster-token", "")
        is_local = host in LOOPBACK or host == server       # same machine, bound interface
        if not is_local or (internal_token and not hmac.compare_digest(
                token.encode("latin-1"), internal_token.encode())):
            raise APIError(403, "internal endpoint", "permission_error", code=403)

    async def read_json(request: Request):
        return parse_json(await read_body(request, cfg.router.max_body_bytes))

    @app.post("/v1/completions", openapi_extra=request_body(COMPLETION_BODY))
    async def completions(request: Request):
        authorize(request)
        return await respond(parse_completion(await read_json(request)), request)

    @app.post("/v1/chat/completions", openapi_extra=request_body(CHAT_BODY))
    async def chat_completions(request: Request):
        authorize(request)
        return await respond(parse_chat(await read_json(request)), request)

    app.direct_routes = {("POST", "/v1/completions"): completions,
                         ("POST", "/v1/chat/completions"): chat_completions}

    async def respond(parsed, request: Request):
        gens = await service.start_choices(parsed, request.headers.get("traceparent"))
        rid_header = {"x-request-id": gens[0].st.rid}  # joins logs, /debug and traces
        if service.frontend_id is not None:
            rid_header[FRONTEND_HEADER] = service.frontend_id
        if parsed.stream:
            return EventStreamResponse(lambda wire: stream_choices(service, gens, wire),
                                       headers={**SSE_HEADERS, **rid_header})
        try:
            body = await whole_response(service, gens, request.is_disconnected)
        except APIError as e:
            e.headers.update(rid_header)
            raise
        if body is None:                                  # client went away
            return JSONResponse(error_body("client disconnected", "aborted", 499), 499,
                                headers=rid_header)
        return JSONResponse(body, headers=rid_header)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        data = [model_card(m, cfg.model.max_model_len) for m in service.served_models()]
        return {"object": "list", "data": data}

    add_tokenize_routes(app, service, authorize, read_json)
    add_admin_routes(app, service, authorize, read_json, answered)

    @app.get("/health")
    async def health():
        answer = await service.ask("health")
        if service.is_draining and isinstance(answer.body, dict):   # this front end stops admitting
            return JSONResponse({**answer.body, "status": "draining"}, status_code=503)
        return answered(answer)

    @app.get("/metrics")
    async def metrics(request: Request):
        if cfg.router.metrics_require_key:
            authorize(request)
        answer = await service.ask("metrics")
        if answer.status != 200:
            return answered(answer)
        return Response(answer.body, media_type=METRICS_CONTENT_TYPE)

    @app.get("/debug/requests/{request_id}")
    async def debug_request(request_id: str, request: Request):
        """The phases of a recent request (the last RECENT_REQUESTS admitted)."""
        authorize(request)
        return answered(await service.ask("debug_request", {"request_id": request_id}))

    @app.get("/internal/workers", include_in_schema=False)
    async def internal_workers(request: Request):
        internal_only(request)
        return answered(await service.ask("internal_workers"))

    @app.post("/internal/workers/{worker_id}/exit", include_in_schema=False)
    async def internal_worker_exit(worker_id: str, request: Request):
        internal_only(request)
        raw = await read_body(request, cfg.router.max_body_bytes)
        body = parse_json(raw) if raw else {}
        reason = str(body.get("reason", "process exited")) if isinstance(body, dict) else ""
        return answered(await service.ask("worker_exit", {"worker_id": worker_id, "reason": reason}))

    return app


def answered(answer) -> JSONResponse:
    headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after is not None else None
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)
