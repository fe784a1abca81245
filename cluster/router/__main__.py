"""`python -m cluster.router --config C [--control EP] [--host H] [--port N] [--log-dir D]`.

Binds the control endpoint first (workers may connect before HTTP is up), loads the
tokenizers, then serves HTTP with uvicorn. With `[router] api_servers` > 1 this process is
the dispatcher only and HTTP is served by that many front-end processes (frontends.py). SIGTERM / SIGINT: stop admitting (503 and
/health 503), drain in-flight requests for up to `--drain-timeout` seconds, fail what is
left with an error event, close the listener and the control socket, exit 0. A second
signal exits at once.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import replace

import uvicorn

from cluster.config import ConfigError, default_config, load_config
from cluster.roles import ROUTER_TOKEN_ENV, api_servers
from cluster.router.app import create_app
from cluster.router.dispatcher import Dispatcher
from cluster.router.service import RouterService
from cluster.startup_heap import freeze_startup_heap

log = logging.getLogger("pdcluster.router")
KEEP_ALIVE_S = 65               # idle HTTP connections: longer than clients keep theirs


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the router before shutting down."""

    def __init__(self, config: uvicorn.Config, service: RouterService, drain_s: float):
        super().__init__(config)
        self.service, self.drain_s = service, drain_s
        self._is_draining = False

    def handle_exit(self, sig, frame) -> None:            # NOTE: runs in the signal handler
        if self._is_draining or self.should_exit:
            self.force_exit = self.should_exit = True
            return
        self._is_draining = True
        asyncio.get_event_loop().call_soon_threadsafe(
            lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        freeze_startup_heap()                             # tokenizers and app loaded: serving next

    async def _drain_then_exit(self) -> None:
        log.info("shutdown requested: draining for up to %.1f s", self.drain_s)
        await self.service.drain(self.drain_s)
        self.service.dispatcher.fail_all("router shutting down")
        self.service.dispatcher.shutdown_workers("router shutting down")
        await asyncio.sleep(0.2)                          # let error events reach clients
        self.should_exit = True


def http_config(app, host: str, port: int) -> uvicorn.Config:
    # NOTE: an idle keep-alive connection is closed by the client first: uvicorn's default
    # (5 s) equals httpx's own expiry, so a pooled connection could be reused just as the
    # server closed it, and that request was reset (a ReadError with no response at all)
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                          timeout_graceful_shutdown=2, lifespan="off", timeout_keep_alive=KEEP_ALIVE_S)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cluster.router")
    ap.add_argument("--config", default=None, help="cluster TOML (default: built-in defaults)")
    ap.add_argument("--control", default=None, help="ZeroMQ control endpoint to bind")
    ap.add_argument("--host", default=None, help="HTTP host (default: router.host)")
    ap.add_argument("--port", type=int, default=None, help="HTTP port (default: router.port)")
    ap.add_argument("--log-dir", default=None, help="log to DIR/router.log instead of stderr")
    ap.add_argument("--drain-timeout", type=float, default=5.0)
    return ap.parse_args(argv)


def setup_logging(log_dir, name: str = "router") -> None:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, f"{name}.log"))
    level = os.environ.get("PDCLUSTER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, handlers=[handler], force=True,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_dir)
    try:
        cfg = load_config(args.config) if args.config else default_config()
    except ConfigError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("control", args.control)) if v is not None}
    cfg = replace(cfg, router=replace(cfg.router, **overrides))
    dispatcher = Dispatcher(cfg)
    dispatcher.start()
    try:
        service = RouterService(cfg, dispatcher)
    except RuntimeError as e:                             # [tracing] set, no SDK installed
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        dispatcher.close()
        return 2
    num_frontends = api_servers(cfg)
    if num_frontends > 1:                                 # HTTP in front-end processes, dispatch here
        from cluster.router.frontends import FrontendSupervisor
        try:
            return FrontendSupervisor(service, num_frontends, args.config, args.log_dir, args.drain_timeout).run()
        finally:
            dispatcher.close()
            service.tracing.close()
    try:
        service.load_tokenizers()
    except Exception as e:
        log.exception("cannot load the tokenizer")
        print(f"error: cannot load the tokenizer: {e}", file=sys.stderr)
        dispatcher.close()
        return 1
    app = create_app(service, os.environ.get(ROUTER_TOKEN_ENV, ""))
    config = http_config(app, cfg.router.host, cfg.router.port)
    server = DrainingServer(config, service, args.drain_timeout)
    log.info("serving %s on http://%s:%d (control %s)", ", ".join(service.served_models()),
             cfg.router.host, cfg.router.port, dispatcher.control_endpoint)
    try:
        server.run()
    finally:
        dispatcher.close()
        service.tracing.close()                           # flush the last spans
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
