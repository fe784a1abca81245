"""Authenticated planes: with CURVE keys only holders of the cluster key pair are heard
(others' handshakes are refused and counted), a live worker's identity cannot be taken
over by a second connection, and keys are written private."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from cluster.config import default_config
from cluster.wire import protocol as P
from cluster.wire.curve import CurveKeys, is_wanted, keys_for, read_keys, write_keys
from cluster.wire.transport import ControlClient, ControlServer, DataPlane

T = 10.0
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keys(tmp_path):
    return write_keys(str(tmp_path / "keys"))


def test_keys_are_written_private_and_read_back(tmp_path):
    d = tmp_path / "keys"
    k = write_keys(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "cluster.key_secret").st_mode) == 0o600
    assert read_keys(str(d)) == k == write_keys(str(d))          # kept, not regenerated
    os.chmod(d / "cluster.key_secret", 0o644)
    with pytest.raises(RuntimeError, match="chmod 600"):
        read_keys(str(d))


def pdcluster_keys(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.launch.cli", "keys", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_pdcluster_keys_writes_a_private_pair_and_replaces_it_only_with_force(tmp_path):
    d = tmp_path / "keys"
    done = pdcluster_keys(str(d))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(d / "cluster.key"), str(d / "cluster.key_secret")]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "cluster.key_secret").st_mode) == 0o600
    first = read_keys(str(d))
    refused = pdcluster_keys(str(d))
    assert refused.returncode == 1 and "already holds CURVE keys; --force" in refused.stderr
    assert read_keys(str(d)) == first == write_keys(str(d))      # untouched; the launcher keeps it too
    assert pdcluster_keys(str(d), "--force").returncode == 0
    second = read_keys(str(d))
    assert second != first and stat.S_IMODE(os.stat(d / "cluster.key_secret").st_mode) == 0o600
    assert sorted(os.listdir(d)) == ["cluster.key", "cluster.key_secret"]
    with ControlServer(curve=second) as server, ControlClient(server.endpoint, "decode-0", curve=second) as client:
        client.send(P.Abort("r", "test"))
        assert server.recv(T) == ("decode-0", P.Abort("r", "test"))   # the new pair serves a plane


def test_curve_auto_is_on_only_off_loopback():
    assert not is_wanted("auto", ["127.0.0.1", "::1", "localhost"], env={})
    assert is_wanted("auto", ["127.0.0.1", "0.0.0.0"], env={})
    assert is_wanted("on", ["127.0.0.1"], env={}) and not is_wanted("off", ["10.0.0.1"], env={})
    assert is_wanted("auto", ["127.0.0.1"], env={"PDCLUSTER_CURVE": "on"})
    assert keys_for(default_config(env={}).security, ["127.0.0.1"], env={}) is None


def test_curve_peers_with_the_cluster_key_talk(keys):
    with ControlServer(curve=keys) as server, \
            ControlClient(server.endpoint, "decode-0", curve=keys) as client:
        client.send(P.Abort("r1", "hello"))
        assert server.recv(T) == ("decode-0", P.Abort("r1", "hello"))
        server.send("decode-0", P.Abort("r2", "back"))
        assert client.recv(T) == P.Abort("r2", "back")
    with DataPlane("prefill-0", curve=keys) as a, DataPlane("decode-0", curve=keys) as b:
        a.send_to(b.address, P.Abort("r3", "kv"))
        assert b.recv(T) == ("prefill-0", P.Abort("r3", "kv"))


@pytest.mark.parametrize("intruder", ["plain", "other_key"])
def test_unauthenticated_frames_are_rejected_and_counted(keys, intruder):
    with ControlServer(curve=keys) as server:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"decode-0")
        if intruder == "other_key":            # knows the server's public key, not the secret
            public, secret = zmq.curve_keypair()
            CurveKeys(public, secret).dial(sock)
            sock.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
        sock.connect(server.endpoint)
        for _ in range(3):
            sock.send_multipart(P.encode(P.Abort("evil", "takeover")))
        assert server.recv(1.0) is None
        reason = "unauthenticated" if intruder == "other_key" else "handshake_failed"
        for _ in range(300):                   # up to 30 s: a bound on a hang, not on a loaded machine
            if server.rejected_frames.get(reason):
                break
            server.recv(0.1)
        assert server.rejected_frames.get(reason, 0) >= 1, server.rejected_frames
        sock.close()
        ctx.term()


def test_a_live_worker_identity_cannot_be_taken_over():
    with ControlServer() as server, ControlClient(server.endpoint, "decode-0") as real:
        real.send(P.Abort("r0", "first"))
        assert server.recv(T) == ("decode-0", P.Abort("r0", "first"))
        with ControlClient(server.endpoint, "decode-0") as impostor:
            impostor.send(P.Abort("evil", "takeover"))
            assert server.recv(1.0) is None                      # refused, not handed over
            server.send("decode-0", P.Abort("r1", "prompt"))
            assert real.recv(T) == P.Abort("r1", "prompt")
            assert impostor.recv(0.5) is None
