"""The application across hosts on a real network: network namespaces on a private bridge (benchmarks/netns.py),
Ray started in each (head; attention host; expert hosts, each holding one replica of every expert group),
token authentication on. Faults go on an expert host's link while OpenAI clients keep sending; every
answer must equal the in-process engine's (greedy, float32) and none may fail.

Needs root for the namespaces; skips, saying why, without it. `python -m benchmarks.netns up` builds the same
cluster by hand; `python -m benchmarks.network` measures what latency costs."""

from __future__ import annotations

import sys
import time

import pytest

from benchmarks.load import PROMPTS, Stream, client, expected, progress
from benchmarks.netns import GCS_PORT, build, unavailable
from benchmarks.network import sweep

pytestmark = [pytest.mark.ray, pytest.mark.netns]
CALL_TIMEOUT_S = 2.0  # experts.call_timeout_s of the application under test
GROUPS = 2  # 8 experts, 4 per replica


@pytest.fixture(scope="module")
def net(tiny_dir):
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    c, url = build(tiny_dir, expert_hosts=2, call_timeout_s=CALL_TIMEOUT_S)
    with c:
        yield c, url


@pytest.fixture(scope="module")
def want(tiny_dir):
    return expected(tiny_dir, PROMPTS)


def report(fault: str, stream: Stream) -> str:
    line = f"{fault}: {stream.summary()}"
    print(f"\nnetns: {line}")
    return line


def check(stream: Stream, line: str) -> None:
    assert stream.failed == 0, f"{line}; errors: {stream.errors[:3]}"
    assert stream.sent == stream.completed == stream.identical, line


def traffic_since(before: dict[str, int], now: dict[str, int]) -> int:
    """Data-plane bytes a host received since `before` (new connections count from zero)."""
    return sum(max(0, n - before.get(k, 0)) for k, n in now.items())


def wait_for_traffic(c, host, before: dict[str, int], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while traffic_since(before, c.data_bytes(host)) < 4096:
        assert time.monotonic() < deadline, f"{what}: no data-plane traffic to {host.name} in {timeout_s} s"
        time.sleep(0.5)


def test_tokens_equal_with_experts_on_other_hosts(net, want):
    c, url = net
    api = client(url)
    x1, x2, at = c.hosts["x1"], c.hosts["x2"], c.hosts["at"]
    before = {h.name: c.data_bytes(h) for h in (x1, x2)}
    for p, (text, _) in zip(PROMPTS, want):
        r = api.completions.create(
            model="tiny", prompt=p, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].text == text, p
    # One replica of each group listens on each expert host; the attention host holds none, and the
    # layers' batches crossed the bridge to both expert hosts from the attention host's address.
    assert len(c.listeners(x1)) == len(c.listeners(x2)) == GROUPS
    assert c.listeners(at) == [] and c.listeners(c.head) == []
    for h in (x1, x2):
        now = c.data_bytes(h)
        assert traffic_since(before[h.name], now) > 0, f"no data-plane traffic reached {h.name}"
        assert all(k.split("<-")[1].rsplit(":", 1)[0] == at.ip for k in now), now


def test_a_host_without_the_cluster_token_reads_nothing(net):
    """Ray's token authentication is on across the hosts: from the attention host's address, a process
    with the cluster's token reads the data plane's key from Ray's GCS; one with another token is refused."""
    c, _ = net
    code = (
        "from ray._raylet import GcsClient; "
        f"print(len(GcsClient(address='{c.head.ip}:{GCS_PORT}').internal_kv_get(b'channel-secret', b'mixserve')))"
    )
    ok = c.exec(c.hosts["at"], sys.executable, "-c", code, env=c.env(), timeout=60)
    assert ok.stdout.strip() == "32", ok.stdout
    bad = c.exec(
        c.hosts["at"], sys.executable, "-c", code, env={**c.env(), "RAY_AUTH_TOKEN": "0" * 64}, check=False, timeout=60
    )
    assert bad.returncode != 0 and "AuthenticationError" in bad.stderr, bad.stderr[-500:]


def test_added_latency_keeps_tokens_and_shows_in_the_round_trip(net, want):
    c, url = net
    rows = sweep(c, url, (0, 5, 20), concurrency=4, requests=10, max_tokens=16)
    for r in rows:
        print(
            f"\nnetns: +{r['added_delay_ms']} ms on the expert links: {r['requests']} requests, "
            f"layer round trip {r['layer_round_trip_ms']} ms, {r['output_tok_per_s']} tok/s"
        )
        assert r["texts"] == [want[i % len(PROMPTS)][0] for i in range(r["requests"])], r["added_delay_ms"]
    rtt = {r["added_delay_ms"]: r["layer_round_trip_ms"] for r in rows}
    # No layer's fan-out can come back sooner than the delay added to its round trip; part of the delay
    # hides behind the other micro-batch's attention, so the mean grows by a little less than it.
    assert rtt[5] >= 5 and rtt[20] >= 20, rtt
    assert rtt[20] - rtt[0] >= 10, rtt
    assert rows[2]["output_tok_per_s"] < rows[0]["output_tok_per_s"], rows


def test_packet_loss_loses_nothing(net, want):
    c, url = net
    x1 = c.hosts["x1"]
    dropped = c.dropped(x1)
    c.impair(x1, loss_pct=3)
    try:
        with Stream(url, "tiny", PROMPTS, want, n=4) as stream:
            progress(stream, 16)
    finally:
        c.impair(x1)
    line = report(f"3% loss on x1 ({c.dropped(x1) - dropped} frames dropped)", stream)
    assert c.dropped(x1) > dropped, "the wire dropped nothing: the fault was not made"
    check(stream, line)


def test_partition_longer_than_the_call_timeout_then_heal(net, want):
    c, url = net
    x1 = c.hosts["x1"]
    partition_s = 4 * CALL_TIMEOUT_S  # > the call timeout, < Ray's node-death detection (~15 s)
    with Stream(url, "tiny", PROMPTS, want, n=4) as stream:
        progress(stream, 4)
        c.link(x1, up=False)
        t0 = time.monotonic()
        try:
            progress(stream, 4, timeout=partition_s + 30)  # answered while x1 is cut off: x2's replicas
            during = time.monotonic() - t0
            time.sleep(max(0.0, partition_s - during))
        finally:
            c.link(x1, up=True)
        healed = c.data_bytes(x1)
        # x1's replicas come back into the directory's view and the client's rotation.
        wait_for_traffic(c, x1, healed, 90, "after the partition healed")
        progress(stream, 4)
    line = report(f"x1 cut off for {partition_s:.0f} s (first answers {during:.1f} s into it), then healed", stream)
    check(stream, line)
    assert len(c.listeners(x1)) == GROUPS, "x1's replicas did not survive the partition"


def test_expert_host_removed_and_a_new_one_joins(net, want):
    c, url = net
    with Stream(url, "tiny", PROMPTS, want, n=4) as stream:
        progress(stream, 4)
        c.remove(c.hosts["x1"])
        t0 = time.monotonic()
        progress(stream, 6)  # the other host's replicas carry every group meanwhile
        x3 = c.add_host("x3", {"expert_slot": 4}, wired=True)
        deadline = time.monotonic() + 240
        while len(c.listeners(x3)) < GROUPS:
            assert time.monotonic() < deadline, "Serve placed no replacement replicas on the new host"
            time.sleep(1)
        placed = time.monotonic() - t0
        wait_for_traffic(c, x3, {}, 60, "the new host")
        progress(stream, 4)
    check(stream, report(f"x1 removed for good, x3 joined (its replicas listening {placed:.0f} s after)", stream))
