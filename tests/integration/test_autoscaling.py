"""Expert replicas follow routed-token load: a hot expert grows to its max, the others stay at their min,
everything shrinks back after the load, and no request fails or changes its tokens meanwhile."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
from ray import serve

from benchmarks.load import Clients
from cluster.api.ingress import replica_counts
from cluster.build import local_engine
from cluster.config import AppConfig
from cluster.serve.app import build_attention
from model.sampling import SamplingParams
from model.tiny import preset_config, write_checkpoint

HOT = 3
APP = "skewed"


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    d = tmp_path_factory.mktemp("skewed")
    write_checkpoint(d, preset_config("tiny", torch_dtype="float32"), hot_expert=HOT)
    return str(d)


@pytest.fixture(scope="module")
def deployed(skewed):
    # Replicas push their load every 0.25 s (Serve's default is 10 s) so the test runs in seconds.
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.25"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.25"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = AppConfig(
        model=skewed,
        dtype="float32",
        attention={"num_cpus": 0},
        experts={
            "num_cpus": 0,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "tokens_per_s_per_replica": 1e9,
                "upscale_delay_s": 1.0,
                "downscale_delay_s": 3.0,
                "look_back_period_s": 2.0,
            },
        },
    )
    handle = serve.run(build_attention(cfg), name=APP, route_prefix=None)
    yield cfg, handle
    serve.shutdown()
    ray.shutdown()
    for k in (
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
    ):
        os.environ.pop(k, None)


class Load(Clients):
    """`n` client threads sending greedy requests in a loop; checks every answer against `want`."""

    JOIN_S = 120

    def __init__(self, handle, prompts, want, n: int, max_tokens: int, pause: float = 0.0):
        self.handle, self.prompts, self.want, self.max_tokens = handle, prompts, want, max_tokens
        self.pause = pause  # think time between a client's requests: a paced, light load
        self.sent = self.completed = self.failed = self.identical = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        super().__init__(n)

    def run(self, i: int) -> None:
        k = i
        while not self.stop.is_set():
            p = k % len(self.prompts)
            k += 1
            with self.lock:
                self.sent += 1
            try:
                toks = []
                params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True)
                for out in self.handle.options(stream=True).generate.remote(self.prompts[p], params):
                    assert out.error is None, out.error
                    toks += out.new_token_ids
                with self.lock:
                    self.completed += 1
                    self.identical += toks == self.want[p]
            except Exception as e:  # noqa: BLE001 - counted and reported
                with self.lock:
                    self.failed += 1
                    self.errors.append(f"{type(e).__name__}: {e}"[:300])
            self.stop.wait(self.pause)


def wait_for(pred, timeout: float, timeline: list, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = replica_counts(APP)
        timeline.append((round(time.monotonic(), 1), counts))
        if pred(counts):
            return counts
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout} s; replica counts over time: {timeline[-10:]}")


@pytest.mark.ray
def test_hot_expert_scales_up_under_load_and_back_down(deployed, skewed):
    cfg, handle = deployed
    local = local_engine(skewed, "float32")
    texts = ["Once upon a time", "The capital of France is", "def f(x): return", "1 2 3 4", "Hello, how are"]
    prompts = [local.tokenizer.encode(t) for t in texts]
    want = [
        o.new_token_ids
        for o in local.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    ]
    groups = [f"expert-group-{g}" for g in range(8)]

    # Measure the load first (capacity 1e9: no scaling), then set the per-replica capacity between
    # the hot expert's rate and the coldest-but-busiest one's, as an operator would from /metrics.
    before = handle.stats.remote().result().routed_tokens
    t0 = time.monotonic()
    with Load(handle, prompts, want, n=6, max_tokens=24) as load:
        time.sleep(6)
    after = handle.stats.remote().result().routed_tokens
    dt = time.monotonic() - t0
    rate = {e: 0.0 for e in range(8)}
    for _l, e, n in after:
        rate[e] += n
    for _l, e, n in before:
        rate[e] -= n
    rate = {e: n / dt for e, n in rate.items()}
    cold_max = max(v for e, v in rate.items() if e != HOT)
    assert rate[HOT] > 2.5 * cold_max, f"the checkpoint is not skewed enough: {rate}"
    capacity = (rate[HOT] / 2 + cold_max) / 2  # hot wants >= 2 replicas, every other expert 1
    assert load.failed == 0 and load.identical == load.completed > 0

    cfg.experts.autoscaling.tokens_per_s_per_replica = capacity
    handle = serve.run(build_attention(cfg), name=APP, route_prefix=None)  # in-place config update
    timeline: list = []
    with Load(handle, prompts, want, n=6, max_tokens=24) as up:
        counts = wait_for(lambda c: c.get(groups[HOT]) == 2, 60, timeline, "hot expert at max_replicas")
        assert all(counts[g] == 1 for i, g in enumerate(groups) if i != HOT), counts
        time.sleep(3)  # keep the load on the grown deployment: new replicas take traffic
    peak = replica_counts(APP)
    assert peak[groups[HOT]] == 2 and all(peak[g] == 1 for i, g in enumerate(groups) if i != HOT), peak
    # A light, paced load while it shrinks: the replica being removed drains, no request fails.
    # Unpaced, one client on 2 cores can still push the hot expert past `capacity` (a single
    # stream runs faster per request than six), so the think time keeps its rate well below.
    with Load(handle, prompts, want, n=1, max_tokens=24, pause=1.0) as down:
        wait_for(lambda c: c.get(groups[HOT]) == 1, 60, timeline, "hot expert back at min_replicas")
        time.sleep(1)
    for ld in (load, up, down):
        assert ld.failed == 0, ld.errors[:3]
        assert ld.identical == ld.completed > 0
    print(
        f"\nskewed load: rates { ({e: round(v) for e, v in rate.items()}) } tok/s, capacity {capacity:.0f}; "
        f"up: sent {up.sent} completed {up.completed} failed {up.failed}; down: sent {down.sent} "
        f"completed {down.completed} failed {down.failed}"
    )
    t0 = timeline[0][0]
    changes = [
        (round(t - t0, 1), c.get(groups[HOT]), max(c.get(g, 0) for g in groups if g != groups[HOT]))
        for i, (t, c) in enumerate(timeline)
        if i == 0 or c != timeline[i - 1][1]
    ]
    print("(seconds, hot group replicas, most replicas of any other group) at each change:", changes)
