"""Faults under a steady stream of requests on a multi-node cluster (several raylets on one machine):
an expert replica dies, an attention replica dies, a whole expert node is removed (and a new one joins),
an expert replica hangs.
Every request must complete with the tokens of an undisturbed run (greedy, float32)."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from benchmarks.load import PROMPTS, Stream, expected, progress
from cluster.api.ingress import replica_counts
from cluster.config import AppConfig
from cluster.serve.app import build_app
from tests.support import free_port

pytestmark = pytest.mark.ray
APP = "chaos"
GROUPS = [f"expert-group-{g}" for g in range(4)]  # 8 experts, 2 per worker


@pytest.fixture(scope="module")
def chaos(tiny_dir):
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            "resources": {"ingress_slot": 2, "attention_slot": 2},
        },
    )
    nodes = [c.add_node(num_cpus=1, resources={"expert_slot": 4}) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    cfg = AppConfig(
        model=tiny_dir,
        dtype="float32",
        server={"resources": {"ingress_slot": 1}, "served_model_name": "tiny"},
        attention={"replicas": 2, "num_cpus": 0, "resources": {"attention_slot": 1}},
        experts={
            "experts_per_worker": 2,
            "replicas": 2,
            "num_cpus": 0,
            "resources": {"expert_slot": 1},
            "call_timeout_s": 3,
            "max_tries": 6,
        },
    )
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield c, nodes, f"http://127.0.0.1:{port}/v1"
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def test_metrics_asks_both_attention_replicas_at_once_and_answers(chaos):
    """/metrics asks each attention replica in one go: calls made while serving one request share its
    internal request id, and each must still be sent (cluster/serve/routing.py)."""
    base = chaos[2].removesuffix("/v1")
    for _ in range(5):
        text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        assert "mixserve_running_sequences " in text


def test_a_prefix_comes_back_to_the_attention_replica_that_cached_it(chaos):
    """Two attention replicas, each with its own prefix cache: a prompt's next turn (the prompt and
    more) is routed to the replica that computed the prompt, so its full blocks are found there."""
    import json
    import random

    _, _, url = chaos
    g = random.Random(3)

    def complete(prompt: list[int]) -> dict:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    found, possible = 0, 0
    for _ in range(8):
        first = [g.randrange(3, 32000) for _ in range(g.randrange(40, 90))]
        complete(first)
        usage = complete(first + [g.randrange(3, 32000) for _ in range(8)])["usage"]
        found += usage["prompt_tokens_details"]["cached_tokens"]
        possible += len(first) // 16 * 16
    print(f"\nprefix affinity, 2 attention replicas: {found}/{possible} prompt tokens found in the cache")
    assert found == possible  # by chance (no affinity) about half would be


def test_requests_survive_replica_and_node_failures(chaos, tiny_dir):
    c, nodes, url = chaos
    want = expected(tiny_dir, PROMPTS)
    events = []
    with Stream(url, "tiny", PROMPTS, want, n=4) as stream:
        progress(stream, 4)
        # 1. An expert replica dies (its process is killed, as in a crash).
        info = serve.get_deployment_handle(GROUPS[1], app_name=APP).info.remote().result()
        os.kill(info["pid"], signal.SIGKILL)
        events.append(("expert replica killed", stream.sent))
        progress(stream, 6)
        # 2. An attention replica dies mid-stream: the ingress re-submits its requests elsewhere. The
        # one killed is running requests (a stats call reaches either replica; 4 clients on 2 replicas
        # leave one of them idle at times, and killing that one would test nothing).
        attention = serve.get_deployment_handle("AttentionWorker", app_name=APP)
        deadline = time.monotonic() + 30
        while (st := attention.stats.remote().result()).running < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert st.running >= 1, "no attention replica was running a request"
        os.kill(st.pid, signal.SIGKILL)
        events.append(("attention replica killed", stream.sent))
        progress(stream, 6)
        # 3. A whole expert node goes away; its replicas' twins on the other node carry on.
        c.remove_node(nodes[0])
        events.append(("expert node removed", stream.sent))
        progress(stream, 6)
        # ... and a new node joins: Serve places the lost replicas there.
        c.add_node(num_cpus=1, resources={"expert_slot": 4})
        deadline = time.monotonic() + 120
        while not all(replica_counts(APP).get(g) == 2 for g in GROUPS):
            assert time.monotonic() < deadline, f"replicas not rescheduled: {replica_counts(APP)}"
            time.sleep(1)
        events.append(("replicas back on the new node", stream.sent))
        progress(stream, 4)
        # 4. An expert replica hangs (stopped, not dead): calls to it time out and are re-sent.
        hung = serve.get_deployment_handle(GROUPS[2], app_name=APP).info.remote().result()["pid"]
        os.kill(hung, signal.SIGSTOP)
        events.append(("expert replica hung", stream.sent))
        try:
            progress(stream, 6)
        finally:
            os.kill(hung, signal.SIGCONT)
    metrics = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30).read().decode()
    resubmits = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("mixserve_attention_resubmits_total ")
    )
    summary = (
        f"sent {stream.sent}, completed {stream.completed}, failed {stream.failed}, "
        f"identical {stream.identical}, re-submitted after the attention kill {resubmits:.0f}; events {events}"
    )
    print("\nchaos:", summary)
    assert stream.failed == 0, f"{summary}; errors: {stream.errors[:3]}"
    assert stream.identical == stream.completed == stream.sent, summary
    assert resubmits >= 1, f"the attention kill hit no request in flight: {summary}"
