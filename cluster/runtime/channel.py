"""A direct TCP data plane between an attention worker and its expert replicas.

Ray stays the control plane (placement, restarts, failure detection, the fallback path); the
per-layer token batches go over one persistent TCP connection per expert replica instead of a Ray
call each. A Ray call costs several milliseconds of scheduling and (de)serialisation on a small
machine; a framed send/recv on an open socket costs tens of microseconds plus the bytes
(`mixserve bench` measures both). It works the same between processes of one node and across nodes
(the replica listens on its node's IP).

Every connection starts with a mutual handshake on a per-application secret that Ray hands to both
sides (never sent, never logged); nothing is read beyond the fixed-size handshake until the peer
has proved it holds the secret, compared in constant time:

    server -> client   HELLO u32 | nonce_s 16B
    client -> server   nonce_c 16B | HMAC-SHA256(secret, "mxch-client" | nonce_s | nonce_c)
    server -> client   HMAC-SHA256(secret, "mxch-server" | nonce_c | nonce_s)

Then frames (little-endian), one request and one response per call, matched by call id:

    request   MAGIC u32 | call u32 | layer i32 | dtype u8 | pad 3 | cols u32 | k u32
              | k x (expert i32, rows u32) | rows x cols
    response  MAGIC u32 | call u32 | layer i32 | status u8 | dtype u8 | pad 2 | cols u32 | k u32
              | (OK) k x (expert i32, rows u32) | payload      | (ERROR, NOT_HERE) len u32 | utf-8 message

The server checks every field of a request against the worker's shape (`FrameLimits`: the layer, the
hidden width, the experts it holds, a row bound) before it allocates the payload; a frame that fails
is answered with an error and the connection is closed. A frame for experts or a model this worker
does not hold (another group's replica on a recycled port) is answered NOT_HERE, which the client
treats as that replica's failure and re-sends elsewhere. The client checks each response against its
request (layer, experts in order, row counts, dtype, width) before it allocates, and a mismatch is
that replica's failure too. Connections still in the handshake are capped apart from authenticated
ones and get `handshake_timeout_s`, so peers without the secret can hold no authenticated slot and
no pending one for long; idle connections and slow frames time out; the listener outlives every error.

A connection that breaks or times out is closed and never reused: the caller re-sends the call
(through Ray, to the next replica) exactly as for a dead replica. Calls are idempotent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MAGIC = 0x4D584348  # "MXCH"
HELLO = 0x4D584831  # "MXH1"
NONCE = 16
MAC = 32
REQ = struct.Struct("<IIiB3xII")
RESP = struct.Struct("<IIiBB2xII")
OK, ERROR, NOT_HERE = 0, 1, 2  # response status
ENTRY = struct.Struct("<iI")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

HANDSHAKE_TIMEOUT_S = 2.0  # a peer proves the secret in one round trip; longer only holds a pending slot


class ChannelError(ConnectionError):
    """The connection to an expert replica broke, timed out or spoke nonsense; re-send elsewhere."""


class RemoteExpertError(RuntimeError):
    """The expert worker refused or raised on this call (not a transport problem; re-sending will not help)."""


class WrongReplica(ChannelError):
    """The replica holds other experts (or another model) than the call is for, e.g. another group's
    replica on a recycled port: that replica's failure; re-send elsewhere."""


class BadResponse(ChannelError):
    """A response that does not answer its request (layer, experts, row counts, dtype, width): that
    replica's failure, never its output; re-send elsewhere."""


def new_secret() -> bytes:
    return os.urandom(32)


def _mac(secret: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(secret, label + a + b, hashlib.sha256).digest()


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> memoryview:
    """Fill `view` (bytes) from the socket; the peer closing first, or `deadline` passing before the bytes
    are there, is a ChannelError. Bytes that arrived in time are read even when the reader comes late."""
    got, n = 0, len(view)
    while got < n:
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.0))  # 0.0: only what has arrived already
        try:
            r = sock.recv_into(view[got:], n - got)
        except (TimeoutError, BlockingIOError):
            raise ChannelError("frame not received in time") from None
        if r == 0:
            raise ChannelError("connection closed by the peer")
        got += r
    return view


def _send_frame(sock: socket.socket, head: bytes, payload: memoryview | None) -> None:
    """A frame's header and payload in one `sendmsg` (one segment where it fits): sent apart, the
    peer woke once for the header and again for the payload, ~0.1 ms each on a small VM. What the
    kernel did not take at once (a large payload) follows with `sendall`."""
    if payload is None:
        sock.sendall(head)
        return
    sent = sock.sendmsg([head, payload])
    if sent < len(head):
        sock.sendall(memoryview(head)[sent:])
        sent = len(head)
    if sent - len(head) < len(payload):
        sock.sendall(payload[sent - len(head) :])


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> memoryview:
    return _recv_into(sock, memoryview(bytearray(n)), deadline)


class Staging:
    """One connection's host side of its frames, for tensors that live on `device`.

    On the CPU a frame's payload is read into a new tensor (the caller keeps it: its rows are the
    expert outputs it combines, possibly while the next call is read) and sent from the tensor itself.
    On a CUDA device the bytes pass through pinned host buffers that the connection keeps and grows,
    one per direction, with a CUDA stream per direction: a received payload is read into the pinned
    buffer and copied to the device asynchronously (the buffer is reused once that copy is done); a
    payload to send is copied device-to-host on the send stream and leaves once that copy has landed
    (the one synchronisation the data plane needs: the bytes leave the host). A round trip costs the
    wire and two copies, never an allocation of host memory per call. A GPU-direct transport (NCCL,
    NIXL) would replace this class and the socket under it, not the frames' callers."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._in = self._out = None  # pinned uint8 buffers (CUDA only)
        if self.cuda:
            self._in_stream = torch.cuda.Stream(self.device)
            self._out_stream = torch.cuda.Stream(self.device)
            self._in_done: torch.cuda.Event | None = None

    @classmethod
    def for_device(cls, device: torch.device | str | None) -> Staging:
        """A connection's staging: its own for a CUDA device, the shared host one otherwise."""
        return cls(device) if device is not None and torch.device(device).type == "cuda" else HOST_STAGING

    @staticmethod
    def _grow(buf: torch.Tensor | None, n: int) -> torch.Tensor:
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 2 * (buf.numel() if buf is not None else 0)), dtype=torch.uint8, pin_memory=True)
        return buf

    def recv(
        self, sock: socket.socket, rows: int, cols: int, dtype: torch.dtype, deadline: float | None = None
    ) -> torch.Tensor:
        """[rows, cols] of `dtype` read from the socket, on this staging's device."""
        if not self.cuda:
            out = torch.empty(rows, cols, dtype=dtype, device="cpu")
            _recv_into(sock, memoryview(out.view(torch.uint8).numpy()).cast("B"), deadline)
            return out
        n = rows * cols * dtype.itemsize
        if self._in_done is not None:  # the previous payload's copy out of the buffer has finished
            self._in_done.synchronize()
        self._in = self._grow(self._in, n)
        _recv_into(sock, memoryview(self._in[:n].numpy()).cast("B"), deadline)
        host = self._in[:n].view(dtype).view(rows, cols)
        cur = torch.cuda.current_stream(self.device)
        out = torch.empty(rows, cols, dtype=dtype, device=self.device)  # from the caching allocator, on `cur`
        self._in_stream.wait_stream(cur)
        with torch.cuda.stream(self._in_stream):
            out.copy_(host, non_blocking=True)
            self._in_done = torch.cuda.Event()
            self._in_done.record(self._in_stream)
        cur.wait_stream(self._in_stream)  # whatever runs next on `cur` sees the copy done
        return out

    def payload(self, flat: torch.Tensor) -> memoryview:
        """The bytes of a contiguous tensor, on the host."""
        if flat.device.type != "cuda":
            return memoryview(flat.view(torch.uint8).numpy()).cast("B")
        n = flat.numel() * flat.element_size()
        self._out = self._grow(self._out, n)
        host = self._out[:n]
        self._out_stream.wait_stream(torch.cuda.current_stream(flat.device))  # the tensor is computed
        with torch.cuda.stream(self._out_stream):
            host.copy_(flat.view(torch.uint8).view(-1), non_blocking=True)
        self._out_stream.synchronize()
        return memoryview(host.numpy()).cast("B")


HOST_STAGING = Staging()  # CPU tensors: nothing kept, shared by every connection


def _pack(
    batches: dict[int, torch.Tensor], staging: Staging = HOST_STAGING
) -> tuple[bytes, memoryview | None, int, torch.dtype | None]:
    """Entries and one contiguous payload (on the host, through `staging`) for {expert: [n, cols]}."""
    entries = b"".join(ENTRY.pack(e, int(x.shape[0])) for e, x in batches.items())
    if not batches:
        return entries, None, 0, None
    xs = list(batches.values())
    flat = xs[0].contiguous() if len(xs) == 1 else torch.cat(xs)
    return entries, staging.payload(flat), int(flat.shape[1]), flat.dtype


def _discard(sock: socket.socket, n: int, deadline: float) -> None:
    """Read and drop n bytes in bounded pieces (a refused frame's payload)."""
    buf = memoryview(bytearray(min(n, 1 << 16)))
    while n > 0:
        _recv_into(sock, buf[: min(n, len(buf))], deadline)
        n -= min(n, len(buf))


def _entries(raw, k: int) -> list[tuple[int, int]]:
    return [ENTRY.unpack_from(raw, i * ENTRY.size) for i in range(k)]


def _split(flat: torch.Tensor, entries: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    out, start = {}, 0
    for e, n in entries:
        out[e] = flat[start : start + n]
        start += n
    return out


@dataclass(frozen=True)
class FrameLimits:
    """What a request frame may hold, from the worker's shape: checked before anything is allocated."""

    num_layers: int
    cols: int  # the hidden width D
    experts: frozenset[int]  # the experts this worker holds
    max_rows: int  # token rows in one call, summed over its experts

    @classmethod
    def for_worker(cls, worker, max_rows: int) -> FrameLimits:
        return cls(worker.cfg.num_hidden_layers, worker.cfg.hidden_size, frozenset(worker.experts), max_rows)

    # Each check gives None or (status, why): NOT_HERE where the frame is for a worker of another shape
    # (another group's, another model's: the caller re-sends elsewhere), ERROR where no worker takes it.

    def check_header(self, layer: int, dt: int, cols: int, k: int) -> tuple[int, str] | None:
        if dt >= len(DTYPES):
            return ERROR, f"unknown dtype code {dt}"
        if k < 1:
            return ERROR, "a call for no experts"
        if not 0 <= layer < self.num_layers:
            return NOT_HERE, f"layer {layer} is not in [0, {self.num_layers})"
        if cols != self.cols:
            return NOT_HERE, f"rows of {cols} values; this model's hidden size is {self.cols}"
        if k > len(self.experts):
            return NOT_HERE, f"{k} experts in one call; this worker holds {len(self.experts)}"
        return None

    def check_rows(self, entries: list[tuple[int, int]]) -> tuple[int, str] | None:
        rows = sum(n for _, n in entries)
        return (ERROR, f"{rows} token rows in one call; the limit is {self.max_rows}") if rows > self.max_rows else None

    def check_experts(self, layer: int, entries: list[tuple[int, int]]) -> tuple[int, str] | None:
        es = [e for e, _ in entries]
        if len(set(es)) != len(es):
            return ERROR, f"experts {es} (layer {layer}): an expert twice"
        if not set(es) <= self.experts:
            return NOT_HERE, f"experts {es} (layer {layer}): this worker holds experts {sorted(self.experts)}"
        return None


def _listen(host: str, ports: tuple[int, int] | None) -> socket.socket:
    """A listening socket on `host`: the first free port of `ports` (inclusive), or any free port."""
    if ports is None:
        return socket.create_server((host, 0), backlog=64)
    for port in range(ports[0], ports[1] + 1):
        try:
            return socket.create_server((host, port), backlog=64)
        except OSError:
            continue
    raise OSError(f"no free data-plane port on {host} in {ports[0]}-{ports[1]}")


class ChannelServer:
    """Runs in an expert replica: accepts authenticated connections and answers each frame with `worker.run`."""

    def __init__(
        self,
        worker,
        host: str,
        secret: bytes,
        limits: FrameLimits,
        max_connections: int = 64,
        idle_timeout_s: float = 600.0,
        frame_timeout_s: float = 30.0,
        ports: tuple[int, int] | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        max_handshakes: int = 8,
    ):
        if len(secret) < 16:
            raise ValueError("the channel secret must be at least 16 bytes")
        self.worker, self.secret, self.limits = worker, secret, limits
        self.max_connections, self.idle_timeout_s, self.frame_timeout_s = (
            max_connections,
            idle_timeout_s,
            frame_timeout_s,
        )
        self.handshake_timeout_s, self.max_handshakes = handshake_timeout_s, max_handshakes
        self.sock = _listen(host, ports)
        self.address = (host, self.sock.getsockname()[1])
        self.closed = False
        self.draining = False
        self._conns: set[socket.socket] = set()  # authenticated
        self._pending: set[socket.socket] = set()  # still in the handshake: apart, so they take no real peer's slot
        self._lock = threading.Lock()
        self.refused = 0  # connections refused (over a cap, or failed the handshake)
        self.bad_frames = 0  # frames refused before any allocation
        threading.Thread(target=self._accept, name="expert-channel-accept", daemon=True).start()

    @property
    def num_connections(self) -> int:
        """Connections held, authenticated or still in the handshake."""
        return len(self._conns) + len(self._pending)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError as e:
                if self.closed:
                    return
                log.warning("expert channel accept failed; listening on", extra={"error": type(e).__name__})
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            with self._lock:
                full = len(self._pending) >= self.max_handshakes
                if not full:
                    self._pending.add(conn)
            if full:  # closed at once: a flood of silent peers costs no thread and no wait
                self.refused += 1
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="expert-channel", daemon=True).start()
            except RuntimeError:  # cannot start a thread
                self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)
            self._pending.discard(conn)
        try:
            conn.close()
        except OSError:
            pass

    def _handshake(self, conn: socket.socket) -> bool:
        deadline = time.monotonic() + self.handshake_timeout_s
        nonce_s = os.urandom(NONCE)
        conn.settimeout(self.handshake_timeout_s)
        conn.sendall(struct.pack("<I", HELLO) + nonce_s)
        try:
            msg = bytes(_recv_exact(conn, NONCE + MAC, deadline))
        except (ChannelError, OSError):
            self.refused += 1  # silent, slow or gone before proving anything
            return False
        nonce_c, mac = msg[:NONCE], msg[NONCE:]
        if not hmac.compare_digest(mac, _mac(self.secret, b"mxch-client", nonce_s, nonce_c)):
            self.refused += 1
            return False
        with self._lock:  # proved the secret: it takes an authenticated slot, if one is free
            self._pending.discard(conn)
            room = len(self._conns) < self.max_connections
            if room:
                self._conns.add(conn)
        if not room:
            self.refused += 1  # closed before the server's proof: the client sees a failed handshake
            return False
        conn.sendall(_mac(self.secret, b"mxch-server", nonce_c, nonce_s))
        return True

    def _answer_error(self, conn: socket.socket, call: int, layer: int, status: int, why: str) -> None:
        msg = why.encode()[:4096]
        conn.settimeout(self.frame_timeout_s)
        conn.sendall(RESP.pack(MAGIC, call, layer, status, 0, 0, 0) + struct.pack("<I", len(msg)) + msg)

    def _refuse(self, conn: socket.socket, call: int, layer: int, status: int, why: str) -> None:
        self.bad_frames += 1
        self._answer_error(conn, call, layer, status, why)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._handshake(conn):
                return
            staging = Staging.for_device(getattr(self.worker, "device", None))
            with torch.inference_mode():  # once per connection, not per call
                self._frames(conn, staging)
        except (ChannelError, OSError, struct.error):
            pass  # the client went away, timed out or sent garbage: drop this connection only
        except Exception:  # noqa: BLE001 - never let one connection's surprise reach the others
            log.exception("expert channel connection failed")
        finally:
            self._drop(conn)

    def _frames(self, conn: socket.socket, staging: Staging) -> None:
        """Answer the connection's frames until it closes or sends one that ends it."""
        lim = self.limits
        while not self.closed:
            conn.settimeout(self.idle_timeout_s)  # an idle or half-open connection is closed
            header = _recv_exact(conn, REQ.size)
            deadline = time.monotonic() + self.frame_timeout_s  # the rest of the frame, promptly
            magic, call, layer, dt, cols, k = REQ.unpack(header)
            if magic != MAGIC:
                return
            why = lim.check_header(layer, dt, cols, k)
            if why is not None:
                return self._refuse(conn, call, layer, *why)
            entries = _entries(_recv_exact(conn, ENTRY.size * k, deadline), k)
            why = lim.check_rows(entries)
            if why is not None:
                return self._refuse(conn, call, layer, *why)
            nbytes = sum(n for _, n in entries) * cols * DTYPES[dt].itemsize
            why = lim.check_experts(layer, entries)
            if why is not None:  # a well-formed frame for experts held elsewhere: refuse it, keep the connection
                _discard(conn, nbytes, deadline)
                self._refuse(conn, call, layer, *why)
                continue
            flat = staging.recv(conn, sum(n for _, n in entries), cols, DTYPES[dt], deadline)
            if self.draining:  # being removed: the caller re-sends elsewhere
                return self._refuse(conn, call, layer, ERROR, "draining")
            try:
                out = self.worker.run(layer, _split(flat, entries))
            except Exception as e:  # noqa: BLE001 - sent back to the caller, who raises it
                self._answer_error(conn, call, layer, ERROR, f"{type(e).__name__}: {e}")
                continue
            entries_out, payload, cols_out, dtype_out = _pack(out, staging)
            conn.settimeout(self.frame_timeout_s)  # the caller takes its response promptly, or is dropped
            dt_out = DTYPES.index(dtype_out) if dtype_out is not None else 0
            _send_frame(conn, RESP.pack(MAGIC, call, layer, OK, dt_out, cols_out, len(out)) + entries_out, payload)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            conns = [*self._conns, *self._pending]
        for c in conns:
            self._drop(c)


class ChannelClient:
    """One authenticated connection to one expert replica; `send` returns a call id, `result(call)` its output.

    Responses come back in request order; `result` reads (and keeps) earlier ones as needed, so
    several calls may be in flight at once (micro-batches). Not for use from several threads at once.
    """

    def __init__(self, address: tuple[str, int], timeout_s: float, secret: bytes, device: torch.device | str = "cpu"):
        """`device`: where the outputs are wanted (the attention side's), the staging's device."""
        self.address = tuple(address)
        self.staging = Staging.for_device(device)
        try:
            self.sock = socket.create_connection(self.address, timeout=min(timeout_s, HANDSHAKE_TIMEOUT_S))
        except OSError as e:  # refused, unreachable, timed out: the replica is gone or not there yet
            raise ChannelError(f"connect to {self.address} failed: {e}") from None
        self.timeout_s = timeout_s
        self.next_call = 0
        self.sent: list[tuple] = []  # (call, layer, entries, cols, dtype, deadline) awaiting a response
        self.done: dict[int, dict | Exception] = {}
        self.alive = True
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = bytes(_recv_exact(self.sock, 4 + NONCE))
            if struct.unpack_from("<I", hello)[0] != HELLO:
                raise ChannelError(f"{self.address} is not an expert channel")
            nonce_s, nonce_c = hello[4:], os.urandom(NONCE)
            self.sock.sendall(nonce_c + _mac(secret, b"mxch-client", nonce_s, nonce_c))
            proof = bytes(_recv_exact(self.sock, MAC))
            if not hmac.compare_digest(proof, _mac(secret, b"mxch-server", nonce_c, nonce_s)):
                raise ChannelError(f"{self.address} failed authentication")
        except (OSError, ChannelError) as e:
            self.close()
            raise ChannelError(f"handshake with {self.address} failed: {e}") from None
        self.sock.settimeout(timeout_s)

    def send(self, layer: int, batches: dict[int, torch.Tensor]) -> int:
        if not self.alive:
            raise ChannelError(f"channel to {self.address} is closed")
        entries, payload, cols, dtype = _pack(batches, self.staging)
        call = self.next_call
        self.next_call = (self.next_call + 1) & 0xFFFFFFFF
        try:
            self.sock.settimeout(self.timeout_s)  # reads leave their deadline's remainder on the socket
            _send_frame(
                self.sock, REQ.pack(MAGIC, call, layer, DTYPES.index(dtype), cols, len(batches)) + entries, payload
            )
        except OSError as e:
            self.close()
            raise ChannelError(f"send to {self.address} failed: {e}") from None
        expect = [(e, int(x.shape[0])) for e, x in batches.items()]  # what its response must carry
        self.sent.append((call, layer, expect, cols, dtype, time.monotonic() + self.timeout_s))
        return call

    def result(self, call: int) -> dict[int, torch.Tensor]:
        while call not in self.done:
            if not self.alive or not self.sent:
                raise ChannelError(f"no response for call {call} from {self.address}")
            # The timeout runs from the send: calls in flight together on several connections (one
            # host cut off) all time out together instead of one after the other.
            want, layer, expect, cols, dtype, deadline = self.sent[0]
            try:
                magic, got, g_layer, status, dt, g_cols, k = RESP.unpack(_recv_exact(self.sock, RESP.size, deadline))
                if magic != MAGIC or got != want:
                    raise ChannelError("out-of-order or corrupt response")
                if g_layer != layer or status not in (OK, ERROR, NOT_HERE):
                    raise BadResponse(f"answered layer {g_layer} status {status} for layer {layer}")
                if status != OK:
                    (n,) = struct.unpack("<I", _recv_exact(self.sock, 4, deadline))
                    if n > 4096:
                        raise BadResponse(f"an error message of {n} bytes")
                    msg = bytes(_recv_exact(self.sock, n, deadline)).decode(errors="replace")
                    if msg == "draining":  # the replica is being removed: like a dead one, re-send elsewhere
                        raise ChannelError("draining")
                    self.done[got] = (
                        WrongReplica(f"{self.address}: {msg}") if status == NOT_HERE else RemoteExpertError(msg)
                    )
                else:
                    # Checked before reading on, so a replica that is not the one asked (or lies) can neither
                    # pass off other rows as the answer nor make the client allocate what it names.
                    if (DTYPES[dt] if dt < len(DTYPES) else None, g_cols, k) != (dtype, cols, len(expect)):
                        raise BadResponse(
                            f"answered {k} experts of width {g_cols}, dtype code {dt}, for "
                            f"{len(expect)} of width {cols}, {dtype}"
                        )
                    entries = _entries(_recv_exact(self.sock, ENTRY.size * k, deadline), k)
                    if entries != expect:
                        raise BadResponse(f"answered (expert, rows) {entries} for {expect}")
                    rows = sum(n for _, n in entries)
                    self.done[got] = _split(self.staging.recv(self.sock, rows, cols, dtype, deadline), entries)
            except ChannelError as e:  # first: it is an OSError too; it keeps its kind (BadResponse)
                self.close()
                raise type(e)(f"expert channel {self.address}: {e}") from None
            except (OSError, struct.error) as e:  # timeout, reset, closed
                self.close()
                raise ChannelError(f"expert channel {self.address}: {type(e).__name__}: {e}") from None
            self.sent.pop(0)
        out = self.done.pop(call)
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        """Close the connection; calls still in flight on it are abandoned (the replica stops at the
        next frame it cannot answer), which is how a timed-out call is cancelled."""
        self.alive = False
        try:
            self.sock.close()
        except OSError:
            pass
