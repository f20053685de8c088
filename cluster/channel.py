"""A direct TCP data plane between an attention worker and its expert actors.

Ray stays the control plane (placement, restarts, failure detection, the fallback path); the
per-layer token batches go over one persistent TCP connection per expert replica instead of a Ray
actor call each. A Ray call costs several milliseconds of scheduling and (de)serialisation on a
small machine; a framed send/recv on an open socket costs tens of microseconds plus the bytes
(benchmarks/README, `mixserve bench`). It works the same between processes of one node and across
nodes (the actor listens on its node's IP).

Frames (little-endian), one request and one response per call, matched by call id:

    request   MAGIC u32 | call u32 | layer i32 | dtype u8 | pad 3 | cols u32 | k u32 | k x (expert i32, rows u32) | rows x cols
    response  MAGIC u32 | call u32 | status u8 | pad 3 | k u32 | (status 0) k x (expert i32, rows u32) | payload
                                                        | (status 1) len u32 | utf-8 error message

A connection that breaks or times out is closed and never reused: the caller re-sends the call
(through Ray, to the next replica) exactly as for a dead actor. Calls are idempotent.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading

import torch

log = logging.getLogger(__name__)

MAGIC = 0x4D584348  # "MXCH"
REQ = struct.Struct("<IIiB3xII")
RESP = struct.Struct("<IIB3xI")
ENTRY = struct.Struct("<iI")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class ChannelError(ConnectionError):
    """The connection to an expert replica broke, timed out or spoke nonsense; re-send elsewhere."""


class RemoteExpertError(RuntimeError):
    """The expert worker raised on this call (not a transport problem; re-sending will not help)."""


def _recv_into(sock: socket.socket, view: memoryview) -> memoryview:
    """Fill `view` (bytes) from the socket; the peer closing first is a ChannelError."""
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ChannelError("connection closed by the peer")
        got += r
    return view


def _recv_exact(sock: socket.socket, n: int) -> memoryview:
    return _recv_into(sock, memoryview(bytearray(n)))


def _recv_tensor(sock: socket.socket, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(rows, cols, dtype=dtype)
    _recv_into(sock, memoryview(out.view(torch.uint8).numpy()).cast("B"))
    return out


def _pack(batches: dict[int, torch.Tensor]) -> tuple[bytes, memoryview | None, int, torch.dtype | None]:
    """Entries and one contiguous payload for {expert: [n, cols]}."""
    entries = b"".join(ENTRY.pack(e, int(x.shape[0])) for e, x in batches.items())
    if not batches:
        return entries, None, 0, None
    xs = list(batches.values())
    flat = xs[0].contiguous() if len(xs) == 1 else torch.cat(xs)
    return entries, memoryview(flat.view(torch.uint8).numpy()).cast("B"), int(flat.shape[1]), flat.dtype


def _unpack(sock: socket.socket, k: int, cols: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    raw = _recv_exact(sock, ENTRY.size * k) if k else b""
    entries = [ENTRY.unpack_from(raw, i * ENTRY.size) for i in range(k)]
    total = sum(n for _, n in entries)
    flat = _recv_tensor(sock, total, cols, dtype)
    out, start = {}, 0
    for e, n in entries:
        out[e] = flat[start : start + n]
        start += n
    return out


class ChannelServer:
    """Runs in an expert actor: accepts connections and answers each frame with `worker.run`."""

    def __init__(self, worker, host: str):
        self.worker = worker
        self.sock = socket.create_server((host, 0), backlog=64)
        self.address = (host, self.sock.getsockname()[1])
        threading.Thread(target=self._accept, name="expert-channel-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="expert-channel", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                magic, call, layer, dt, cols, k = REQ.unpack(_recv_exact(conn, REQ.size))
                if magic != MAGIC or dt >= len(DTYPES):
                    raise ChannelError("bad frame")
                batches = _unpack(conn, k, cols, DTYPES[dt])
                try:
                    out = self.worker.run(layer, batches)
                except Exception as e:  # noqa: BLE001 - sent back to the caller, who raises it
                    msg = f"{type(e).__name__}: {e}".encode()[:4096]
                    conn.sendall(RESP.pack(MAGIC, call, 1, 0) + struct.pack("<I", len(msg)) + msg)
                    continue
                entries, payload, _, _ = _pack(out)
                conn.sendall(RESP.pack(MAGIC, call, 0, len(out)) + entries)
                if payload is not None:
                    conn.sendall(payload)
        except (ChannelError, OSError):
            pass  # the client went away or sent garbage: drop this connection only
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


class ChannelClient:
    """One connection to one expert replica; `send` returns a call id, `result(call)` its output.

    Responses come back in request order; `result` reads (and keeps) earlier ones as needed, so
    several calls may be in flight at once (micro-batches). Not for use from several threads at once.
    """

    def __init__(self, address: tuple[str, int], timeout_s: float):
        self.address = tuple(address)
        self.sock = socket.create_connection(self.address, timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.next_call = 0
        self.sent: list[tuple[int, int, torch.dtype]] = []  # (call, cols, dtype) awaiting a response
        self.done: dict[int, dict | Exception] = {}
        self.alive = True

    def send(self, layer: int, batches: dict[int, torch.Tensor]) -> int:
        if not self.alive:
            raise ChannelError(f"channel to {self.address} is closed")
        entries, payload, cols, dtype = _pack(batches)
        call = self.next_call
        self.next_call = (self.next_call + 1) & 0xFFFFFFFF
        try:
            self.sock.sendall(REQ.pack(MAGIC, call, layer, DTYPES.index(dtype), cols, len(batches)) + entries)
            self.sock.sendall(payload)
        except OSError as e:
            self.close()
            raise ChannelError(f"send to {self.address} failed: {e}") from None
        self.sent.append((call, cols, dtype))
        return call

    def result(self, call: int) -> dict[int, torch.Tensor]:
        while call not in self.done:
            if not self.alive or not self.sent:
                raise ChannelError(f"no response for call {call} from {self.address}")
            want, cols, dtype = self.sent[0]
            try:
                magic, got, status, k = RESP.unpack(_recv_exact(self.sock, RESP.size))
                if magic != MAGIC or got != want:
                    raise ChannelError(f"out-of-order or corrupt response from {self.address}")
                if status:
                    (n,) = struct.unpack("<I", _recv_exact(self.sock, 4))
                    self.done[got] = RemoteExpertError(bytes(_recv_exact(self.sock, n)).decode(errors="replace"))
                else:
                    self.done[got] = _unpack(self.sock, k, cols, dtype)
            except (OSError, struct.error) as e:  # timeout, reset, closed
                self.close()
                raise ChannelError(f"expert channel {self.address}: {type(e).__name__}: {e}") from None
            self.sent.pop(0)
        out = self.done.pop(call)
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        self.alive = False
        try:
            self.sock.close()
        except OSError:
            pass
