"""The direct TCP data plane to expert workers (cluster/runtime/channel.py), against a real ExpertWorker:
results, errors, dead and hung peers, and peers that try to break it (no secret, lying headers,
slow, idle and too many connections, floods of unauthenticated ones, no file descriptors left,
replicas of another group, responses that do not answer their request)."""

from __future__ import annotations

import hashlib
import hmac
import os
import resource
import socket
import struct
import threading
import time

import pytest
import torch

from cluster.config import ExpertsConfig
from cluster.runtime.channel import (
    DTYPES,
    ENTRY,
    ERROR,
    HANDSHAKE_TIMEOUT_S,
    HELLO,
    MAGIC,
    NOT_HERE,
    OK,
    REQ,
    RESP,
    BadResponse,
    ChannelClient,
    ChannelError,
    ChannelServer,
    FrameLimits,
    RemoteExpertError,
    WrongReplica,
    _recv_exact,
    new_secret,
)
from cluster.runtime.experts import Endpoint, ExpertClient
from router.dispatch import ExpertRequest
from workers.expert import ExpertWorker

SECRET = new_secret()


@pytest.fixture(scope="module")
def worker(tiny_dir):
    return ExpertWorker(tiny_dir, [1, 2], "float32")


def serve(worker, secret=SECRET, max_rows=4096, **kw) -> ChannelServer:
    return ChannelServer(worker, "127.0.0.1", secret, FrameLimits.for_worker(worker, max_rows), **kw)


def connect(server, timeout_s=10, secret=SECRET) -> ChannelClient:
    return ChannelClient(server.address, timeout_s, secret)


@pytest.fixture()
def server(worker):
    s = serve(worker)
    yield s
    s.close()


def batches(D, sizes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {e: torch.randn(n, D, generator=g).to(dtype) for e, n in sizes.items()}


def test_results_equal_a_direct_call_and_pipeline(worker, server):
    D = worker.cfg.hidden_size
    c = connect(server)
    reqs = [(0, batches(D, {1: 3, 2: 5}, seed=1)), (1, batches(D, {2: 1}, seed=2)), (2, batches(D, {1: 64}, seed=3))]
    calls = [c.send(layer, b) for layer, b in reqs]  # all in flight on one connection
    for call, (layer, b) in reversed(list(zip(calls, reqs))):  # claimed in any order
        got, want = c.result(call), worker.run(layer, b)
        assert got.keys() == want.keys()
        for e in want:
            assert torch.equal(got[e], want[e])
    c.close()


def test_bf16_payloads_round_trip(tiny_dir):
    w = ExpertWorker(tiny_dir, [0], "bfloat16")
    s = serve(w)
    try:
        c = connect(s)
        b = batches(w.cfg.hidden_size, {0: 7}, torch.bfloat16)
        got = c.result(c.send(3, b))
        assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], w.run(3, b)[0])
    finally:
        s.close()


def test_unknown_experts_are_refused_without_counting_and_the_channel_stays_usable(worker, server):
    D = worker.cfg.hidden_size
    c = connect(server)
    calls = worker.stats.calls
    # Expert 5 is not on this worker: it is another group's replica, a failure of this replica (re-sent
    # elsewhere), not of the call.
    with pytest.raises(WrongReplica, match="holds experts"):
        c.result(c.send(0, batches(D, {5: 2})))
    with pytest.raises(WrongReplica, match="holds experts"):
        c.result(c.send(0, batches(D, {1: 1, 7: 3})))
    assert worker.stats.calls == calls and 5 not in worker.stats.tokens_per_expert  # nothing counted
    with pytest.raises(KeyError):  # the worker itself refuses before counting, too
        worker.run(99, batches(D, {1: 1}))
    assert worker.stats.calls == calls and 99 not in worker.stats.tokens_per_layer
    assert c.alive
    assert c.result(c.send(0, batches(D, {1: 2})))[1].shape == (2, D)


def test_a_workers_own_error_is_the_calls_not_the_replicas(worker):
    class Raising:
        cfg, experts = worker.cfg, worker.experts

        def run(self, layer, b):
            raise ValueError("boom")

    s = serve(Raising())
    try:
        c = connect(s)
        with pytest.raises(RemoteExpertError, match="ValueError: boom") as e:
            c.result(c.send(0, batches(worker.cfg.hidden_size, {1: 1})))
        assert not isinstance(e.value, ChannelError) and c.alive  # not retried elsewhere: it would fail there too
    finally:
        s.close()


def test_garbage_drops_only_that_connection(worker, server):
    bad = raw(server)
    bad.sendall(b"\x00" * 64)
    assert closed_by_peer(bad)  # hung up on (or reset, with our garbage unread)
    c = connect(server)
    assert 1 in c.result(c.send(0, batches(worker.cfg.hidden_size, {1: 1})))


def test_a_dead_or_hung_peer_is_a_channel_error(worker):
    class Stuck:
        cfg, experts = worker.cfg, worker.experts

        def run(self, layer, b):
            time.sleep(3)
            return b

    hung = serve(Stuck())
    c = connect(hung, timeout_s=0.5)
    call = c.send(0, batches(worker.cfg.hidden_size, {1: 1}))
    with pytest.raises(ChannelError):
        c.result(call)
    assert not c.alive
    with pytest.raises(ChannelError):
        c.send(0, {})
    hung.close()

    # A peer that dies mid-call: it reads the request and closes the connection.
    crashing = serve(worker)
    c = connect(crashing)
    crashing.worker = None  # the next call raises inside the server thread after the read ...
    crashing.close()  # ... and the replica is gone
    with pytest.raises(ChannelError):  # at the send (reset) or at the result (closed), by timing
        c.result(c.send(0, batches(worker.cfg.hidden_size, {1: 1})))
    assert not c.alive


# ---------------------------------------------------------------- hostile peers


def raw(server) -> socket.socket:
    """A plain TCP connection to the listener, past nothing."""
    s = socket.create_connection(server.address, timeout=3 * HANDSHAKE_TIMEOUT_S)  # outwaits the server's deadline
    hello = s.recv(20)
    assert struct.unpack_from("<I", hello)[0] == HELLO
    return s


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def still_serves(worker, server) -> None:
    c = connect(server)
    b = batches(worker.cfg.hidden_size, {1: 3, 2: 2}, seed=9)
    got, want = c.result(c.send(1, b)), worker.run(1, b)
    assert all(torch.equal(got[e], want[e]) for e in want)
    c.close()


def accept_handshake(conn: socket.socket) -> None:
    """The server's half of the handshake, for hand-written servers that hold the secret."""
    nonce_s = os.urandom(16)
    conn.sendall(struct.pack("<I", HELLO) + nonce_s)
    nonce_c = bytes(_recv_exact(conn, 16 + 32)[:16])
    conn.sendall(hmac.new(SECRET, b"mxch-server" + nonce_c + nonce_s, hashlib.sha256).digest())


def test_the_call_timeout_runs_from_the_send(worker):
    """Calls in flight together on two connections to a host that stopped answering time out together
    (as when a partition cuts off a host holding several replicas), not one timeout after the other; a
    response that arrived in time is read however late the caller comes for it; and a response that
    trickles in keeps no call alive past its deadline."""

    class Stuck:
        cfg, experts = worker.cfg, worker.experts

        def run(self, layer, b):
            time.sleep(3)
            return b

    hung = [serve(Stuck()), serve(Stuck())]
    fast = serve(worker)
    try:
        clients = [connect(h, timeout_s=0.6) for h in (*hung, fast)]
        x = batches(worker.cfg.hidden_size, {1: 2})
        calls = [c.send(0, x) for c in clients]
        t0 = time.monotonic()
        for c, call in zip(clients[:2], calls):
            with pytest.raises(ChannelError):
                c.result(call)
        assert time.monotonic() - t0 < 1.0, "the second call's timeout started after the first's ended"
        # The answer that came in time is read, though its deadline passed while the caller waited above.
        assert time.monotonic() > t0 + 0.6
        torch.testing.assert_close(clients[2].result(calls[2])[1], worker.run(0, x)[1])
    finally:
        for h in (*hung, fast):
            h.close()

    # A server that answers one byte at a time, each within the timeout, still misses the deadline.
    lsock = socket.create_server(("127.0.0.1", 0))

    def trickle():
        conn, _ = lsock.accept()
        accept_handshake(conn)
        _recv_exact(conn, REQ.size)
        for b in RESP.pack(MAGIC, 0, 0, OK, 0, worker.cfg.hidden_size, 1) * 4:
            time.sleep(0.2)
            try:
                conn.sendall(bytes([b]))
            except OSError:
                break
        conn.close()

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    c = ChannelClient(lsock.getsockname(), 0.5, SECRET)
    t0 = time.monotonic()
    with pytest.raises(ChannelError):
        c.result(c.send(0, batches(worker.cfg.hidden_size, {1: 1})))
    assert time.monotonic() - t0 < 1.0
    lsock.close()


def test_a_replica_that_failed_is_reconnected_off_the_callers_thread(worker, server):
    """A replica that failed before (a host cut off from the network) is reconnected in the background
    once its back-off ends: calls go to the group's other replica meanwhile instead of waiting on the
    connect, and a reconnect that fails backs off again."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; no hello ever comes

    class Fleet:
        def endpoints(self, group):
            return [Endpoint("silent", silent.getsockname()), Endpoint("live", server.address)]

        def fallback(self, *a):
            raise AssertionError("the live replica's channel was there")

        def broken(self, key):
            pass

    client = ExpertClient(Fleet(), {1: 0, 2: 0}, ExpertsConfig(call_timeout_s=1.0), SECRET)
    client.bad["silent"] = (silent.getsockname(), 0.0, 1)  # it failed once; its back-off is over
    x = batches(worker.cfg.hidden_size, {1: 3, 2: 2})
    try:
        t0 = time.monotonic()
        for _ in range(4):
            out = client.submit(ExpertRequest(0, x)).result()
            assert time.monotonic() - t0 < 0.8, "a call waited on the silent replica's handshake"
            for e in x:
                torch.testing.assert_close(out[e], worker.run(0, {e: x[e]})[e])
        assert "silent" in client.probes and client.channel_calls == 4
        time.sleep(1.3)  # the reconnect's handshake times out
        client.submit(ExpertRequest(0, x)).result()
        assert client.bad["silent"][2] == 2 and "silent" not in client.probes
    finally:
        client.close()
        silent.close()


def test_a_peer_without_the_secret_gets_nothing(worker, server):
    calls = worker.stats.calls
    s = raw(server)
    s.sendall(os.urandom(48))  # a nonce and a guessed MAC
    assert closed_by_peer(s)
    # a frame sent straight away (no handshake) is read as the handshake and fails it
    s = raw(server)
    s.sendall(REQ.pack(MAGIC, 0, 0, 0, worker.cfg.hidden_size, 1) + ENTRY.pack(1, 1) + bytes(8))
    assert closed_by_peer(s)
    with pytest.raises(ChannelError, match="handshake"):
        connect(server, secret=new_secret())  # the wrong secret
    assert server.refused == 3 and worker.stats.calls == calls  # no frame reached the worker
    still_serves(worker, server)


def test_a_client_refuses_a_server_without_the_secret(worker):
    rogue = serve(worker, secret=new_secret())
    try:
        with pytest.raises(ChannelError, match="handshake"):
            connect(rogue)
    finally:
        rogue.close()


def frame(layer=0, dt=0, cols=None, k=1, entries=((1, 1),), worker=None) -> bytes:
    cols = worker.cfg.hidden_size if cols is None else cols
    return REQ.pack(MAGIC, 7, layer, dt, cols, k) + b"".join(ENTRY.pack(e, n) for e, n in entries)


@pytest.mark.parametrize(
    "lie",
    [
        dict(k=2**32 - 1),  # k x 8 bytes of entries
        dict(entries=((1, 2**32 - 1),)),  # 2^32 rows: hundreds of GiB
        dict(entries=((1, 5000),)),  # over max_rows
        dict(cols=2**31),
        dict(cols=0),
        dict(layer=-1),
        dict(layer=2**31 - 1),
        dict(dt=200),
        dict(k=0, entries=()),
    ],
)
def test_lying_headers_are_refused_before_allocating(worker, server, lie):
    c = connect(server)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c.sock.sendall(frame(worker=worker, **lie))
    magic, call, _, status, *_ = RESP.unpack(_recv_exact(c.sock, RESP.size))
    assert (magic, call) == (MAGIC, 7) and status in (ERROR, NOT_HERE)  # an error answer, not an allocation
    (n,) = struct.unpack("<I", _recv_exact(c.sock, 4))
    assert bytes(_recv_exact(c.sock, n))  # it says why
    assert closed_by_peer(c.sock)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000  # KiB: nothing large was allocated
    assert server.bad_frames >= 1
    still_serves(worker, server)


def test_slow_idle_and_half_open_peers_are_closed(worker):
    s = serve(worker, idle_timeout_s=0.5, frame_timeout_s=0.5)
    try:
        slow = connect(s)
        slow.sock.sendall(frame(worker=worker, entries=((1, 64),)))  # header, then no payload
        idle = connect(s)  # authenticated, then silent (a half-open peer looks the same)
        still_serves(worker, s)  # others are served meanwhile
        time.sleep(1.2)
        assert closed_by_peer(slow.sock) and closed_by_peer(idle.sock)
        deadline = time.monotonic() + 5
        while s.num_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.num_connections == 0  # their threads are gone too
        still_serves(worker, s)
    finally:
        s.close()


def test_connections_are_capped(worker):
    s = serve(worker, max_connections=2)
    try:
        a, b = connect(s), connect(s)
        with pytest.raises(ChannelError):
            connect(s)  # closed at once: the third connection is over the cap
        a.close()
        deadline = time.monotonic() + 5
        while s.num_connections > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        still_serves(worker, s)  # room again
        b.close()
    finally:
        s.close()


def test_the_listener_outlives_running_out_of_file_descriptors(worker):
    s = serve(worker)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 8, hard))
        for _ in range(12):  # the client ends and the accepted ends use up the table: accept() fails
            try:
                held.append(socket.create_connection(s.address, timeout=2))
            except OSError:
                break
        time.sleep(0.3)
    finally:
        for h in held:
            h.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + 5
    while s.num_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        still_serves(worker, s)
    finally:
        s.close()


def test_unauthenticated_connections_take_no_authenticated_slot_and_leave_soon(worker):
    """Peers that never prove the secret (64 of them: once enough to fill `max_connections`) take none
    of the authenticated slots, hold at most `max_handshakes` pending ones (the rest are closed at
    once, before the server's hello), each for the handshake deadline only."""
    s = serve(worker, max_connections=2, max_handshakes=4, handshake_timeout_s=1.0)
    idle, flood = [], []
    try:
        t0 = time.monotonic()
        idle = [raw(s) for _ in range(3)]  # each got its hello and says nothing more
        a, b = connect(s), connect(s)  # meanwhile: the authenticated slots are free
        flood = [socket.create_connection(s.address, timeout=5) for _ in range(64)]  # the one pending slot left
        hellos = 0
        for f in flood:
            got = b""
            try:
                while chunk := f.recv(64):
                    got += chunk
            except ConnectionResetError:
                pass
            hellos += len(got) == 4 + 16
        assert hellos <= 1  # only one more got as far as the hello
        assert all(closed_by_peer(i) for i in idle)
        assert time.monotonic() - t0 < 1.0 + 2.0, "unauthenticated connections outstayed the handshake deadline"
        assert s.refused >= 64
        for c in (a, b):  # the real peers were served all along
            x = batches(worker.cfg.hidden_size, {1: 2})
            torch.testing.assert_close(c.result(c.send(0, x))[1], worker.run(0, x)[1])
        with pytest.raises(ChannelError):
            connect(s)  # the authenticated cap still holds
    finally:
        for f in idle + flood:
            f.close()
        s.close()


def impostor(reply) -> socket.socket:
    """A listener that holds the secret and answers each request frame with
    `reply(call, layer, dt, cols, entries, payload) -> bytes`: a replica that lies, byte by byte."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def run():
        conn, _ = lsock.accept()
        with conn:
            accept_handshake(conn)
            while True:
                try:
                    _, call, layer, dt, cols, k = REQ.unpack(_recv_exact(conn, REQ.size))
                    raw_entries = bytes(_recv_exact(conn, ENTRY.size * k))
                    entries = [ENTRY.unpack_from(raw_entries, i * ENTRY.size) for i in range(k)]
                    payload = bytes(_recv_exact(conn, sum(n for _, n in entries) * cols * DTYPES[dt].itemsize))
                    conn.sendall(reply(call, layer, dt, cols, entries, payload))
                except (ChannelError, OSError):
                    return

    threading.Thread(target=run, daemon=True).start()
    return lsock


def answer(call, layer, dt, cols, entries, payload, status=OK) -> bytes:
    return (
        RESP.pack(MAGIC, call, layer, status, dt, cols, len(entries))
        + b"".join(ENTRY.pack(*e) for e in entries)
        + payload
    )


LIES = {
    "another layer": lambda c, l, d, w, es, p: answer(c, l + 1, d, w, es, p),
    "another dtype": lambda c, l, d, w, es, p: answer(c, l, 1, w, es, p[: len(p) // 2]),
    "half the width": lambda c, l, d, w, es, p: answer(c, l, d, w // 2, es, p[: len(p) // 2]),
    "an expert more": lambda c, l, d, w, es, p: answer(c, l, d, w, es + [(3, 1)], p + p[: w * 4]),
    "an expert fewer": lambda c, l, d, w, es, p: answer(c, l, d, w, es[1:], p[es[0][1] * w * 4 :]),
    "other experts": lambda c, l, d, w, es, p: answer(c, l, d, w, [(e + 2, n) for e, n in es], p),
    "experts reordered": lambda c, l, d, w, es, p: answer(c, l, d, w, es[::-1], p),
    "a row short": lambda c, l, d, w, es, p: answer(c, l, d, w, [es[0], (es[1][0], es[1][1] - 1)], p[: -w * 4]),
    "rows moved between experts": lambda c, l, d, w, es, p: answer(
        c, l, d, w, [(es[0][0], es[0][1] + 1), (es[1][0], es[1][1] - 1)], p
    ),
    "2^32 rows": lambda c, l, d, w, es, p: answer(c, l, d, w, [es[0], (es[1][0], 2**32 - 1)], p),
    "an unknown status": lambda c, l, d, w, es, p: answer(c, l, d, w, es, p, status=9),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_response_that_does_not_answer_its_request_is_refused_before_allocating(worker, lie):
    """An authenticated peer that answers with another layer, dtype, width, other or reordered experts
    or other row counts: the client raises BadResponse (a ChannelError: that replica's failure) and
    closes the connection before it reads, or allocates, what the response names."""
    honest = impostor(answer)
    liar = impostor(LIES[lie])
    try:
        x = batches(worker.cfg.hidden_size, {1: 3, 2: 2})
        c = ChannelClient(honest.getsockname(), 5, SECRET)
        got = c.result(c.send(1, x))  # the control: a faithful echo is accepted as it came
        assert list(got) == [1, 2] and all(torch.equal(got[e], x[e]) for e in x)
        c = ChannelClient(liar.getsockname(), 5, SECRET)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(BadResponse):
            c.result(c.send(1, x))
        assert not c.alive
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000  # KiB
    finally:
        honest.close()
        liar.close()


class Liar:
    """A worker whose answers look right but carry a row too few: served by a real ChannelServer."""

    def __init__(self, worker):
        self.cfg, self.experts, self.worker = worker.cfg, worker.experts, worker

    def run(self, layer, b):
        return {e: y[:-1] for e, y in self.worker.run(layer, b).items()}


@pytest.mark.parametrize("first", ["a liar", "another group's replica"])
def test_a_replica_that_is_not_the_one_asked_is_a_replica_failure_and_the_call_goes_elsewhere(
    worker, server, tiny_dir, first
):
    """The group's first replica answers rows that do not match the request, or holds other experts
    (another group's replica on a recycled port): the call is counted as a retry, re-sent to the
    group's other replica, and the first one is backed off from like any failed replica."""
    bad = serve(Liar(worker) if first == "a liar" else ExpertWorker(tiny_dir, [3, 4], "float32"))

    class Fleet:
        def endpoints(self, group):
            return [Endpoint("bad", bad.address), Endpoint("live", server.address)]

        def fallback(self, *a):
            raise AssertionError("the live replica's channel was there")

        def broken(self, key):
            pass

    client = ExpertClient(Fleet(), {1: 0, 2: 0}, ExpertsConfig(call_timeout_s=5.0), SECRET)
    x = batches(worker.cfg.hidden_size, {1: 3, 2: 2})
    try:
        for _ in range(3):
            out = client.submit(ExpertRequest(0, x)).result()
            for e in x:
                torch.testing.assert_close(out[e], worker.run(0, {e: x[e]})[e])
        assert client.retries == 1 and client.bad["bad"][2] == 1  # tried once, then skipped while backed off
        assert "bad" not in client.channels
    finally:
        client.close()
        bad.close()


def test_the_ray_fallback_sends_each_group_its_own_rows_only():
    """Where no channel is usable a chunk goes through Ray by value. Each expert's batch is a slice of
    the layer's gathered rows (router/dispatch.py) and pickling a slice writes its whole storage, so
    the fallback must send copies of its own rows: a group gets its bytes, not the layer's."""
    import pickle

    from model.moe import MoEInput, route
    from router.dispatch import dispatch

    sent = []

    class Fleet:
        def endpoints(self, group):
            return []  # no channel: every chunk goes through Ray

        def fallback(self, group, layer, part, avoid):
            sent.append((group, part))
            return group

        def wait(self, pending, timeout_s):
            return dict(next(p for g, p in sent if g == pending))

        def cancel(self, pending):
            pass

        def broken(self, key):
            pass

    g = torch.Generator().manual_seed(0)
    rows, D = 256, 64
    w, ids = route(torch.randn(rows, 8, generator=g), 2)
    req, _ = dispatch(MoEInput(0, torch.randn(rows, D, generator=g), w, ids), 8)
    assert any(x.untyped_storage().nbytes() > x.nbytes for x in req.batches.values())  # views, as dispatched
    client = ExpertClient(Fleet(), {e: e // 2 for e in range(8)}, ExpertsConfig(), SECRET)
    out = client.submit(req).result()
    assert client.ray_calls == 4 and len(sent) == 4
    for e, x in req.batches.items():
        assert torch.equal(out[e], x)
    for _, part in sent:
        own = sum(x.nbytes for x in part.values())
        assert len(pickle.dumps(part)) < own + 4096, "a group's call carried rows that are not its own"
