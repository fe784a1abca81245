"""The router's HTTP front-end processes (`[router] api_servers` > 1), run by the dispatcher's process.

The dispatcher's process binds the HTTP port once and every front end inherits that
listening socket (as vLLM's `--api-server-count` does): their accept loops share its queue,
so connections go to whichever front end is free, and a front end restarted after a crash
takes the same socket: the port never closes. Each front end (`python -m
cluster.router.frontend`) connects to the control socket as `frontend-N`; the FrontendHub
serves it. A front end that dies is restarted (with a short backoff) after its requests were
aborted on their workers; the others' requests are not touched. Shutdown: every front end
drains its own streams (SIGTERM), then the dispatcher fails what is left and stops the workers.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

import psutil

from cluster.launch.child_process import Child
from cluster.router.frontend_hub import FrontendHub

log = logging.getLogger("pdcluster.router")
POLL_S = 0.2
RESTART_BACKOFF_S = (0.5, 1, 2, 5)        # after the 1st, 2nd, ... death in a row
HEALTHY_AFTER_S = 30                      # a front end up this long gets its backoff back
ACCEPT_BACKLOG = 2048


class FrontendSupervisor:
    def __init__(self, service, num_frontends: int, config_path, log_dir, drain_s: float):
        cfg, self.service, self.drain_s = service.cfg, service, drain_s
        self.dispatcher = service.dispatcher
        self.sock = socket.create_server((cfg.router.host, cfg.router.port), backlog=ACCEPT_BACKLOG)
        self.sock.set_inheritable(True)
        self.port = self.sock.getsockname()[1]
        ids = [f"frontend-{i}" for i in range(num_frontends)]
        self.hub = FrontendHub(service, ids)
        self.dispatcher.frontends = self.service.metrics.frontends = self.hub
        self.children = {fid: Child(fid, self._argv(fid, config_path, log_dir), dict(os.environ),
                                    os.path.join(log_dir, f"{fid}.log") if log_dir else "",
                                    pass_fds=(self.sock.fileno(),)) for fid in ids}
        self._stopping = threading.Event()

    def _argv(self, frontend_id: str, config_path, log_dir) -> list[str]:
        argv = [sys.executable, "-m", "cluster.router.frontend", "--frontend-id", frontend_id,
                "--control", self.dispatcher.control_endpoint, "--fd", str(self.sock.fileno()),
                "--drain-timeout", str(self.drain_s)]
        return argv + ["--config", config_path] * bool(config_path) + ["--log-dir", log_dir] * bool(log_dir)

    def run(self) -> int:
        """Until SIGTERM / SIGINT: keep every front end running. Then drain and stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for child in self.children.values():
            child.spawn()
        log.info("%d HTTP front ends on http://%s:%d", len(self.children), self.service.cfg.router.host, self.port)
        while not self._stopping.wait(POLL_S):
            now = time.monotonic()
            for child in self.children.values():
                self._watch(child, now)
        self._stop()
        return 0

    def _on_signal(self, sig, frame) -> None:
        if self._stopping.is_set():                # a second signal: no more draining
            for child in self.children.values():
                if child.is_running:
                    child.proc.kill()
        self._stopping.set()

    def _watch(self, child: Child, now: float) -> None:
        if child.is_running:
            child.renew_restart_budget(now, HEALTHY_AFTER_S)
            return
        if child.restart_at is None:               # just found dead
            code = child.proc.returncode if child.proc is not None else None
            num = self.hub.frontend_gone(child.name, f"router front end {child.name} exited")
            backoff = RESTART_BACKOFF_S[min(child.num_restarts, len(RESTART_BACKOFF_S) - 1)]
            log.error("%s exited (code %s); %d of its requests aborted; restarting in %.1f s",
                      child.name, code, num, backoff)
            child.restart_at = now + backoff
        elif now >= child.restart_at:
            child.num_restarts += 1
            child.spawn()

    def _stop(self) -> None:
        self.service.is_draining = True
        running = [c.proc for c in self.children.values() if c.is_running]
        log.info("shutdown requested: %d front end(s) drain for up to %.1f s", len(running), self.drain_s)
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(_processes(running), timeout=self.drain_s + 3)
        for p in alive:
            p.kill()
        for c in self.children.values():
            if c.proc is not None:
                c.proc.poll()                      # reap
        self.dispatcher.fail_all("router shutting down")
        self.dispatcher.shutdown_workers("router shutting down")
        self.sock.close()


def _processes(procs) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            out.append(psutil.Process(p.pid))
        except psutil.NoSuchProcess:
            pass
    return out
