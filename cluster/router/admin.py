"""The admin API, behind the API key like the OpenAI routes:
- `GET  /admin/workers`              every registered worker: id, role, load, phase gauges
- `POST /admin/workers/{id}/role`    {"role": "decode"}: an in-place role switch (role_switch.py);
                                     202 with the worker as it now stands (`switching_to` set)
"""
from __future__ import annotations

import time
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cluster.router.errors import bad_request

GAUGES = ("num_running_reqs", "num_queue_reqs", "token_usage")


def add_admin_routes(app: FastAPI, service, authorize: Callable[[Request], None],
                     read_json: Callable[[Request], Awaitable]) -> None:
    dispatcher = service.dispatcher

    @app.get("/admin/workers")
    async def admin_workers(request: Request):
        authorize(request)
        now = time.monotonic()
        with dispatcher.lock:
            workers = [{**w.describe(now), "load": w.load,
                        **{g: getattr(w.gauges, g) for g in GAUGES}}
                       for w in sorted(dispatcher.directory.workers.values(), key=lambda w: w.worker_id)]
        return {"workers": workers}

    @app.post("/admin/workers/{worker_id}/role")
    async def admin_worker_role(worker_id: str, request: Request):
        authorize(request)
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("role"), str):
            raise bad_request('expected {"role": "prefill" | "decode" | "unified"}')
        return JSONResponse(dispatcher.switch_role(worker_id, body["role"]), status_code=202)
