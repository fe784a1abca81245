"""ZeroMQ CURVE for the control and data planes: one cluster key pair, held by every process.

Every process of a cluster holds the same key pair (`cluster.key` / `cluster.key_secret`
in `[security] keys_dir`, the secret 0600 in a 0700 directory; the launcher writes them,
`pdcluster keys DIR` writes them for workers started by hand, `pdcluster deploy k8s` mounts
them). A bound socket is
a CURVE server; a connecting socket is a CURVE client that presents the cluster key as its
own. The ZAP handler (served on the owning I/O thread, see `io_thread.py`) admits only
clients presenting the cluster public key, so a process without the secret file cannot
complete a handshake: its frames never reach a decoder. Refused handshakes are counted by
reason through a socket monitor.

`[security] curve`: "on", "off", or "auto" = on when any address this cluster binds or
dials is not loopback. The launcher resolves it once and hands the answer to its children
(PDCLUSTER_CURVE, PDCLUSTER_KEYS_DIR) so that every socket of a cluster agrees.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import zmq
from zmq.utils import z85

CURVE_ENV = "PDCLUSTER_CURVE"            # "on" | "off": the launcher's resolved decision
KEYS_DIR_ENV = "PDCLUSTER_KEYS_DIR"
PUBLIC_FILE, SECRET_FILE = "cluster.key", "cluster.key_secret"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
LOOPBACK_NAMES = ("localhost", "")
HANDSHAKE_FAILURES = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
                      zmq.EVENT_HANDSHAKE_FAILED_AUTH: "unauthenticated"}


class CurveError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class CurveKeys:
    public: bytes                        # Z85, 40 bytes
    secret: bytes

    def __post_init__(self) -> None:
        for name in ("public", "secret"):
            if len(getattr(self, name)) != 40:
                raise CurveError(f"CURVE {name} key must be 40 Z85 characters")

    @classmethod
    def generate(cls) -> "CurveKeys":
        """A fresh cluster key pair."""
        return cls(*zmq.curve_keypair())

    def files(self) -> dict[str, str]:
        """{file name: text} of this pair as a keys directory holds it."""
        return {PUBLIC_FILE: self.public.decode() + "\n", SECRET_FILE: self.secret.decode() + "\n"}

    @classmethod
    def from_files(cls, files: dict[str, str]) -> "CurveKeys":
        return cls(files[PUBLIC_FILE].strip().encode(), files[SECRET_FILE].strip().encode())

    def serve(self, sock: zmq.Socket) -> None:
        """A bound socket: CURVE server with the cluster's secret key."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, b"pdcluster")

    def dial(self, sock: zmq.Socket) -> None:
        """A connecting socket: CURVE client presenting the cluster key pair."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def admits(self, mechanism: bytes, credentials: list[bytes]) -> bool:
        """ZAP decision: only a CURVE client holding the cluster key pair."""
        return (mechanism == b"CURVE" and len(credentials) == 1
                and z85.encode(credentials[0]) == self.public)

    def answer_zap(self, zap: zmq.Socket) -> None:
        """Answer the ZAP requests (RFC 27) waiting on `zap`: admit only clients holding
        the cluster key pair."""
        while zap.poll(0):
            frames = zap.recv_multipart()
            ok = len(frames) >= 6 and self.admits(frames[5], frames[6:])
            head = frames[:2] if len(frames) >= 2 else [b"1.0", b""]
            zap.send_multipart([*head, b"200" if ok else b"400",
                                b"OK" if ok else b"not a cluster key", b"", b""])


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_host(endpoint: str) -> str:
    """tcp://HOST:PORT -> HOST; ipc:// and inproc:// never leave the machine ("")."""
    m = re.fullmatch(r"tcp://(.+):[0-9*]+", endpoint)
    return m.group(1) if m else ""


def is_wanted(mode: str, hosts: Iterable[str], env=os.environ) -> bool:
    decided = env.get(CURVE_ENV, "")
    if decided in ("on", "off"):
        return decided == "on"
    if mode in ("on", "off"):
        return mode == "on"
    return any(not is_loopback(h) for h in hosts)


def save_keys(keys_dir: str, keys: CurveKeys, overwrite: bool = False) -> None:
    """Write `keys` into `keys_dir` (made 0700): the public key 0644, the secret 0600 from its
    first byte. An existing key file raises FileExistsError unless `overwrite`; then each file
    is written aside and renamed over the old one, so a reader never sees half a key."""
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    modes = {PUBLIC_FILE: 0o644, SECRET_FILE: 0o600}
    for name, text in keys.files().items():
        path = os.path.join(keys_dir, name)
        target = path + ".new" if overwrite else path
        if overwrite and os.path.exists(target):
            os.unlink(target)                          # a leftover: O_EXCL below must create it
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, modes[name])
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if overwrite:
            os.replace(target, path)


def write_keys(keys_dir: str) -> CurveKeys:
    """A fresh cluster key pair in `keys_dir`, or the pair already there, so workers started
    by hand elsewhere keep matching (the launcher's rule; `pdcluster keys` refuses instead)."""
    if os.path.exists(os.path.join(keys_dir, SECRET_FILE)):
        return read_keys(keys_dir)
    keys = CurveKeys.generate()
    save_keys(keys_dir, keys)
    return keys


def read_keys(keys_dir: str) -> CurveKeys:
    if not keys_dir:
        raise CurveError("CURVE is on but no keys directory is set: [security] keys_dir "
                         f"(or {KEYS_DIR_ENV})")
    out = {}
    for name in (PUBLIC_FILE, SECRET_FILE):
        path = os.path.join(keys_dir, name)
        try:
            with open(path, "rb") as f:
                out[name] = f.read().strip()
        except OSError as e:
            raise CurveError(f"cannot read CURVE key {path}: {e.strerror}") from None
    if os.stat(os.path.join(keys_dir, SECRET_FILE)).st_mode & 0o077:
        raise CurveError(f"{os.path.join(keys_dir, SECRET_FILE)} is readable by others; "
                         "chmod 600 it")
    return CurveKeys(out[PUBLIC_FILE], out[SECRET_FILE])


def keys_for(security, hosts: Iterable[str], env=os.environ) -> Optional[CurveKeys]:
    """The cluster keys when CURVE applies to a process binding/dialing `hosts`, else None."""
    if not is_wanted(security.curve, hosts, env):
        return None
    return read_keys(env.get(KEYS_DIR_ENV, "") or security.keys_dir)
