"""`python -m cluster.router.frontend --frontend-id frontend-N --control EP --fd FD [--config C]`:
one HTTP front end of a router with `[router] api_servers` > 1, started by the dispatcher's
process (frontends.py), never by hand.

It serves the whole HTTP API on the listening socket it inherited (descriptor FD): it parses,
tokenizes, detokenizes and streams itself, and reaches the dispatcher through a
DispatcherLink on the control endpoint. SIGTERM drains its own streams, then it exits; it
exits with the dispatcher's process too (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from dataclasses import replace

from cluster.config import ConfigError, default_config, load_config
from cluster.roles import ROUTER_TOKEN_ENV
from cluster.router.__main__ import DrainingServer, http_config, setup_logging
from cluster.router.app import create_app
from cluster.router.dispatcher_link import DispatcherLink
from cluster.router.service import RouterService

log = logging.getLogger("pdcluster.router")


class FrontendServer(DrainingServer):
    """A SIGTERM while draining is not a second request to stop: the launcher signals the
    router's whole process family at once, and the dispatcher's process signals its front
    ends too. SIGINT twice still exits at once."""

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and self._is_draining and not self.should_exit:
            return
        super().handle_exit(sig, frame)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cluster.router.frontend")
    ap.add_argument("--frontend-id", required=True)
    ap.add_argument("--control", required=True, help="the dispatcher's control endpoint")
    ap.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    ap.add_argument("--config", default=None)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--drain-timeout", type=float, default=5.0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_dir, args.frontend_id)
    try:
        cfg = load_config(args.config) if args.config else default_config()
    except ConfigError as e:
        log.error("%s", e)
        return 2
    cfg = replace(cfg, router=replace(cfg.router, control=args.control))
    link = DispatcherLink(cfg, args.frontend_id, args.control)
    try:
        service = RouterService(cfg, link)
        service.frontend_id = args.frontend_id
        service.load_tokenizers()
        app = create_app(service, os.environ.get(ROUTER_TOKEN_ENV, ""))
        sock = socket.socket(fileno=args.fd)
        host, port = sock.getsockname()[:2]
        server = FrontendServer(http_config(app, host, port), service, args.drain_timeout)
        log.info("%s serving on http://%s:%d (dispatcher %s)", args.frontend_id, host, port, args.control)
        server.run(sockets=[sock])
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
