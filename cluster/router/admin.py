"""The admin API, behind the API key like the OpenAI routes:
- `GET  /admin/workers`              every registered worker: id, role, load, phase gauges
- `POST /admin/workers/{id}/role`    {"role": "decode"}: an in-place role switch (role_switch.py);
                                     202 with the worker as it now stands (`switching_to` set)
"""
from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import FastAPI, Request

from cluster.router.errors import bad_request


def add_admin_routes(app: FastAPI, service, authorize: Callable[[Request], None],
                     read_json: Callable[[Request], Awaitable], answered: Callable) -> None:
    @app.get("/admin/workers")
    async def admin_workers(request: Request):
        authorize(request)
        return answered(await service.ask("admin_workers"))

    @app.post("/admin/workers/{worker_id}/role")
    async def admin_worker_role(worker_id: str, request: Request):
        authorize(request)
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("role"), str):
            raise bad_request('expected {"role": "prefill" | "decode" | "unified"}')
        return answered(await service.ask("switch_role", {"worker_id": worker_id, "role": body["role"]}))
