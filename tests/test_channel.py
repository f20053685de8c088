"""The direct TCP data plane to expert workers (cluster/channel.py), against a real ExpertWorker."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from cluster.channel import ChannelClient, ChannelError, ChannelServer, RemoteExpertError
from workers.expert import ExpertWorker


@pytest.fixture(scope="module")
def worker(tiny_dir):
    return ExpertWorker(tiny_dir, [1, 2], "float32")


@pytest.fixture()
def server(worker):
    s = ChannelServer(worker, "127.0.0.1")
    yield s
    s.close()


def batches(D, sizes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {e: torch.randn(n, D, generator=g).to(dtype) for e, n in sizes.items()}


def test_results_equal_a_direct_call_and_pipeline(worker, server):
    D = worker.cfg.hidden_size
    c = ChannelClient(server.address, timeout_s=10)
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
    s = ChannelServer(w, "127.0.0.1")
    try:
        c = ChannelClient(s.address, timeout_s=10)
        b = batches(w.cfg.hidden_size, {0: 7}, torch.bfloat16)
        got = c.result(c.send(3, b))
        assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], w.run(3, b)[0])
    finally:
        s.close()


def test_worker_error_comes_back_and_the_channel_stays_usable(worker, server):
    D = worker.cfg.hidden_size
    c = ChannelClient(server.address, timeout_s=10)
    with pytest.raises(RemoteExpertError, match="holds experts"):
        c.result(c.send(0, batches(D, {5: 2})))  # expert 5 is not on this worker: not a transport failure
    assert c.alive
    assert c.result(c.send(0, batches(D, {1: 2})))[1].shape == (2, D)


def test_garbage_drops_only_that_connection(worker, server):
    bad = socket.create_connection(server.address)
    bad.sendall(b"\x00" * 64)
    bad.settimeout(5)
    try:
        assert bad.recv(1) == b""  # the server hung up on it
    except ConnectionResetError:
        pass  # ... or reset it, having left our garbage unread
    c = ChannelClient(server.address, timeout_s=10)
    assert 1 in c.result(c.send(0, batches(worker.cfg.hidden_size, {1: 1})))


def test_a_dead_or_hung_peer_is_a_channel_error(worker):
    class Stuck:
        def run(self, layer, b):
            time.sleep(3)
            return b

    hung = ChannelServer(Stuck(), "127.0.0.1")
    c = ChannelClient(hung.address, timeout_s=0.5)
    call = c.send(0, batches(worker.cfg.hidden_size, {1: 1}))
    with pytest.raises(ChannelError):
        c.result(call)
    assert not c.alive
    with pytest.raises(ChannelError):
        c.send(0, {})
    hung.close()

    # A peer that dies mid-call: it reads the request and closes the connection.
    lsock = socket.create_server(("127.0.0.1", 0))

    def crash():
        conn, _ = lsock.accept()
        conn.recv(16)
        conn.close()

    t = threading.Thread(target=crash)
    t.start()
    c = ChannelClient(lsock.getsockname(), timeout_s=5)
    with pytest.raises(ChannelError):  # at the send (reset) or at the result (closed), by timing
        call = c.send(0, batches(worker.cfg.hidden_size, {1: 1}))
        t.join()
        c.result(call)
    t.join()
    assert not c.alive
    lsock.close()
