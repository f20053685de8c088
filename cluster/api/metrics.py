"""Prometheus metrics of the ingress, in a registry of its own, rendered at GET /metrics.

Request-side figures (requests by route and status, prompt/generated tokens, TTFT and inter-token
latency) are counted as they happen; engine and expert figures (running/waiting sequences, KV-cache
use, tokens routed per (layer, expert) and their rate since the last refresh, tokens in flight per
expert, expert round-trip time, replicas per expert group) are read from the attention replicas
(summed) and Serve by the ingress into a snapshot at most `server.metrics_refresh_s` old (the
controller at most every 5 s), never a blocking call on the event loop. Each expert replica also
reports its own load (routed tokens/s, tokens in flight) to the Serve controller for autoscaling and
to Ray's metrics endpoint (mixserve_expert_replica_*).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class AttentionStats:
    """What one attention replica reports (`AttentionWorker.stats()`): its engine, its expert client and
    its process. `summed` adds several replicas' up for /metrics."""

    # the engine
    running: int = 0  # sequences running
    waiting: int = 0  # sequences queued
    kv_usage: float = 0.0  # share of the KV-cache blocks in use
    preemptions: int = 0
    kv_bytes: int = 0  # the KV cache's fixed size
    dense_bytes: int = 0  # the dense weights' size
    # the expert client
    routed_tokens: list[list[int]] = field(default_factory=list)  # [layer, expert, tokens routed so far]
    expert_in_flight_tokens: dict[int, int] = field(default_factory=dict)  # expert -> tokens sent, not back yet
    expert_calls: int = 0  # (layer, group) calls
    expert_call_seconds: float = 0.0  # their summed round trips
    expert_retries: int = 0
    expert_chunks: int = 0  # messages sent (a call split over replicas is several)
    expert_channel_calls: int = 0  # chunks that went over the data plane
    expert_ray_calls: int = 0  # chunks that went through Serve handles (no channel known)
    expert_channels: list[str] = field(default_factory=list)  # replicas with an open channel
    # the process
    pid: int = 0
    node_id: str = ""
    rss_bytes: int = 0
    max_rss_bytes: int = 0
    torch_threads: int = 0

    # Summed over replicas; the rest are one process's figures, not added up.
    SUMMED = ("running", "waiting", "preemptions", "expert_calls", "expert_call_seconds", "expert_retries")

    @classmethod
    def summed(cls, reports: list[AttentionStats]) -> AttentionStats:
        """Several replicas as one: counts summed, KV-cache use averaged, routed and in-flight tokens
        added per (layer, expert) and per expert; the per-process fields are left at their zero."""
        out = cls(**{k: sum(getattr(r, k) for r in reports) for k in cls.SUMMED})
        out.kv_usage = sum(r.kv_usage for r in reports) / len(reports)
        routed: dict[tuple[int, int], int] = {}
        for r in reports:
            for l, e, n in r.routed_tokens:
                routed[(l, e)] = routed.get((l, e), 0) + n
            for e, n in r.expert_in_flight_tokens.items():
                out.expert_in_flight_tokens[e] = out.expert_in_flight_tokens.get(e, 0) + n
        out.routed_tokens = [[l, e, n] for (l, e), n in sorted(routed.items())]
        return out

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mixserve_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("mixserve_prompt_tokens_total", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("mixserve_generation_tokens_total", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "mixserve_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "mixserve_inter_token_latency_seconds", "Time between tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("mixserve_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("mixserve_waiting_sequences", "Sequences waiting for admission", registry=r)
        self.kv_usage = Gauge("mixserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.preemptions = Gauge("mixserve_preemptions", "Sequences preempted for KV space so far", registry=r)
        self.routed = Gauge(
            "mixserve_expert_routed_tokens",
            "Tokens routed to an expert in a layer so far",
            ["layer", "expert"],
            registry=r,
        )
        self.expert_calls = Gauge("mixserve_expert_layer_calls", "Layer fan-outs to the experts so far", registry=r)
        self.expert_seconds = Gauge(
            "mixserve_expert_layer_call_seconds", "Summed layer fan-out round-trip time", registry=r
        )
        self.retries = Gauge("mixserve_expert_retries", "Expert calls re-sent after a failure so far", registry=r)
        self.replicas = Gauge("mixserve_expert_replicas", "Running replicas per expert group", ["group"], registry=r)
        self.load = Gauge(
            "mixserve_expert_load_tokens_per_second",
            "Tokens routed per second to an expert since the previous scrape (layer=all: summed)",
            ["layer", "expert"],
            registry=r,
        )
        self.queued = Gauge(
            "mixserve_expert_queued_tokens", "Tokens sent to an expert and not yet returned", ["expert"], registry=r
        )
        self.group_load = Gauge(
            "mixserve_expert_group_load_tokens_per_second",
            "Tokens routed per second to an expert group's experts since the previous scrape",
            ["group"],
            registry=r,
        )
        self.replicas_min = Gauge(
            "mixserve_expert_replicas_min", "Lower replica bound of an expert group", ["group"], registry=r
        )
        self.replicas_max = Gauge(
            "mixserve_expert_replicas_max", "Upper replica bound of an expert group", ["group"], registry=r
        )
        self.resubmits = Counter(
            "mixserve_attention_resubmits_total",
            "Requests re-submitted to another attention replica after theirs died",
            registry=r,
        )
        self._last: tuple[float, dict] | None = None
        self.groups: list[list[int]] = []

    def set_bounds(self, groups: list[list[int]], bounds: list[tuple[int, int]]) -> None:
        """The expert groups (expert ids of each) and their replica bounds, from the config."""
        self.groups = groups
        for g, (lo, hi) in enumerate(bounds):
            self.replicas_min.labels(str(g)).set(lo)
            self.replicas_max.labels(str(g)).set(hi)

    def update_from(self, stats: AttentionStats, replicas: dict[str, int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        totals: dict[tuple[str, str], int] = {}
        for l, e, n in stats.routed_tokens:
            totals[(str(l), str(e))] = n
            totals[("all", str(e))] = totals.get(("all", str(e)), 0) + n
        if self._last is not None and now > self._last[0]:
            t0, before = self._last
            for key, n in totals.items():
                self.load.labels(*key).set((n - before.get(key, 0)) / (now - t0))
            for g, experts in enumerate(self.groups):
                got = sum(totals.get(("all", str(e)), 0) - before.get(("all", str(e)), 0) for e in experts)
                self.group_load.labels(str(g)).set(got / (now - t0))
        self._last = (now, totals)
        for e, n in stats.expert_in_flight_tokens.items():
            self.queued.labels(str(e)).set(n)
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        self.preemptions.set(stats.preemptions)
        for l, e, n in stats.routed_tokens:
            self.routed.labels(str(l), str(e)).set(n)
        self.expert_calls.set(stats.expert_calls)
        self.expert_seconds.set(stats.expert_call_seconds)
        self.retries.set(stats.expert_retries)
        for g, n in replicas.items():
            self.replicas.labels(g).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
