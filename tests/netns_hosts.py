"""Emulated hosts for multi-host tests: Linux network namespaces joined by veth pairs.

Each host is a namespace with one interface `eth0` (198.18.0.N/24, the RFC 2544
benchmarking range: no real network uses it) whose peer sits on a bridge in a "switch"
namespace; both directions of every link are shaped with `tc` (netem delay + rate where the
kernel has netem, else tbf rate only). Nothing is added to the caller's namespace: the test
talks to its hosts from a thread that entered one of them (`HostThread`), so all traffic
stays inside namespaces this module created, and `close()` kills every process in them and
deletes them, also after a failure (and an earlier run's leftovers, by name).
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Callable, Optional

SUBNET = "198.18.0"
CLONE_NEWNET = 0x40000000
PREFIX = "pdct"                                    # pdct<pid>-<host>: leftovers are findable


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable() -> Optional[str]:
    """Why namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("tc") is None:
        return "`tc` (iproute2) is not installed: no link shaping"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        out = ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` is unavailable: {e}"
    if out.returncode != 0:
        return f"`ip netns add` failed: {out.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def remove_stale() -> None:
    """Delete namespaces left by earlier runs whose process is gone."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            kill_all_in(m.group(1))
            ip("netns", "del", m.group(1), check=False)


def kill_all_in(ns: str, sig: int = signal.SIGKILL) -> list[int]:
    pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


class Hosts:
    """Namespaces `names` on one switch; host i has address 198.18.0.(i+1)."""

    def __init__(self, names: list[str], rate_mbit: int, delay_ms: float = 1.0):
        remove_stale()
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.ns = {h: f"{self.tag}-{h}" for h in names}
        self.addr = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(names)}
        self.rate_mbit, self.delay_ms = rate_mbit, delay_ms
        self.shaping = ""
        try:
            self._build()
        except Exception:
            self.close()
            raise

    def _build(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "dev", "br0", "up")
        for h, ns in self.ns.items():
            ip("netns", "add", ns)
            # created straight inside the namespaces: the caller's namespace never sees them
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", h[:15],
               "netns", self.switch)
            ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "dev", "lo", "up")
            ip("-n", ns, "link", "set", "dev", "eth0", "up")
            ip("-n", self.switch, "link", "set", "dev", h[:15], "master", "br0")
            ip("-n", self.switch, "link", "set", "dev", h[:15], "up")
            self._shape(ns, "eth0")                    # host -> switch
            self._shape(self.switch, h[:15])           # switch -> host

    def _shape(self, ns: str, dev: str) -> None:
        netem = ["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay",
                 f"{self.delay_ms}ms", "rate", f"{self.rate_mbit}mbit", "limit", "10000"]
        tbf = ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
               f"{self.rate_mbit}mbit", "burst", "64kb", "latency", "100ms"]
        for cmd, what in ((netem, f"netem {self.delay_ms} ms + {self.rate_mbit} Mbit/s"),
                          (tbf, f"tbf {self.rate_mbit} Mbit/s (no netem in this kernel: no delay)")):
            if ip("netns", "exec", ns, *cmd, check=False).returncode == 0:
                self.shaping = what
                return
        raise RuntimeError(f"tc cannot shape {dev} in {ns}")

    def counters(self, host: str) -> dict[str, int]:
        """eth0's byte counters of `host`: what crossed its link."""
        out = ip("netns", "exec", self.ns[host], "cat", "/sys/class/net/eth0/statistics/rx_bytes",
                 "/sys/class/net/eth0/statistics/tx_bytes").stdout.split()
        return {"rx_bytes": int(out[0]), "tx_bytes": int(out[1])}

    def set_link(self, host: str, up: bool) -> None:
        ip("-n", self.ns[host], "link", "set", "dev", "eth0", "up" if up else "down")

    def popen(self, host: str, argv: list[str], log_path: str, env: dict) -> subprocess.Popen:
        with open(log_path, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], env=env,
                                    stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def kill_host(self, host: str) -> list[int]:
        return kill_all_in(self.ns[host])

    def close(self) -> None:
        for ns in list(getattr(self, "ns", {}).values()) + [getattr(self, "switch", "")]:
            if not ns:
                continue
            kill_all_in(ns)
            for _ in range(50):                        # the kernel reaps the namespace's sockets
                if not ip("netns", "pids", ns, check=False).stdout.split():
                    break
                time.sleep(0.1)
            ip("netns", "del", ns, check=False)


class HostThread:
    """Runs callables on a thread that entered one host's network namespace: its sockets
    (HTTP clients) live there, while the rest of the test process stays where it was."""

    def __init__(self, ns: str):
        self._ns = ns
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"in-{ns}",
                                           initializer=self._enter)

    def _enter(self) -> None:
        fd = os.open(f"/var/run/netns/{self._ns}", os.O_RDONLY)
        try:
            if ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self._ns} failed")
        finally:
            os.close(fd)

    def run(self, fn: Callable, *args, timeout: float = 300, **kwargs):
        return self._pool.submit(fn, *args, **kwargs).result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
