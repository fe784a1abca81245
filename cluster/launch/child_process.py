"""One supervised child process of the launcher, and stopping a group of them.

Children run in their own sessions (a terminal's Ctrl-C reaches the launcher only, which
orders the shutdown) and get PR_SET_PDEATHSIG, so not even a SIGKILLed launcher leaves
orphans. A child's stdout/stderr go to its log file, so a crash before logging starts is
still in the tail.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

import psutil

log = logging.getLogger("pdcluster.launcher")
TAIL_LINES = 30


@dataclass
class Child:
    name: str                          # "router", a worker id or a router front end
    argv: list[str]
    env: dict
    log_path: str                      # "": stdout and stderr are its parent's
    proc: Optional[subprocess.Popen] = None
    num_restarts: int = 0              # restarts since the budget was last given back
    restart_at: Optional[float] = None
    started_at: float = 0.0
    pass_fds: tuple = ()               # descriptors it inherits (a router front end's listening socket)

    def spawn(self) -> None:
        with open(self.log_path or os.devnull, "ab") as out:
            out = out if self.log_path else None       # no log file: it writes where its parent does
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent, pass_fds=self.pass_fds)
        self.restart_at = None
        self.started_at = time.monotonic()
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def renew_restart_budget(self, now: float, healthy_after: float) -> bool:
        """Give the restart budget back once the process has run `healthy_after` seconds:
        a worker that crashes once a day must not run out of restarts in a week."""
        if self.num_restarts == 0 or not self.is_running or now - self.started_at < healthy_after:
            return False
        log.info("%s: healthy for %.0f s; restart budget renewed (%d used)", self.name,
                 now - self.started_at, self.num_restarts)
        self.num_restarts = 0
        return True

    def tail(self, n: int = TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 64 * 1024))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(lines[-n:])


def _die_with_parent() -> None:
    try:                               # Linux: SIGTERM the child when the launcher dies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_processes(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left of these processes and their children."""
    family = []
    for p in procs:
        try:
            ps = psutil.Process(p.pid)
            family += [ps] + ps.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for ps in family:
        try:
            ps.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for ps in alive:
        log.warning("killing pid %d (no exit after SIGTERM)", ps.pid)
        try:
            ps.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for p in procs:
        p.poll()                                           # reap
