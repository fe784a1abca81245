"""The wire between processes: ZeroMQ + msgpack, never pickle.

- `messages.py`      one frozen dataclass per message type (docs/reference/messages.md) and the typed
                     items nested in them (Peer, KvReq, TokensItem, HistogramSample)
- `checks.py`        field checks (`Int`, `Str`, `Record`, `Typed` ...) raising ProtocolError
- `protocol.py`      the codec: `encode(msg) -> frames`, `decode(frames) -> msg`
- `tensor_frames.py` tensors as zero-copy frames of at most a few MiB
- `io_thread.py`     SocketLoop: the one thread that owns a process's sockets
- `send_backlog.py`  that thread's sends waiting for a slow peer, per destination
- `transport.py`     ControlServer / ControlClient (router <-> workers), DataPlane (KV handoff)
- `curve.py`         CURVE keys and ZAP for authenticated planes
"""
