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
    engine_seconds: dict[str, float] = field(default_factory=dict)  # StepProfile: engine-thread seconds by phase
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_hits: int = 0  # of those, found (not computed)
    prefix_evictions: int = 0  # cached blocks whose memory was taken for new ones
    prefix_cached_blocks: int = 0  # blocks registered in the prefix cache now (held or free)
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
    # the output streams to the ingress replicas (cluster/serve/outputs.py)
    output_messages: int = 0  # messages sent (one per step and ingress replica with outputs)
    outputs_streamed: int = 0  # the outputs they carried

    # Summed over replicas; the rest are one process's figures, not added up.
    SUMMED = ("running", "waiting", "preemptions", "expert_calls", "expert_call_seconds", "expert_retries")
    SUMMED += ("prefix_queries", "prefix_hits", "prefix_evictions", "prefix_cached_blocks")

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


# vLLM's buckets (vllm/v1/metrics/loggers.py), so that its dashboards' and tools' queries read the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TTFT_BUCKETS += (20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
E2E_BUCKETS += (480.0, 960.0, 1920.0, 7680.0)


def buckets_1_2_5(top: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `top` (vLLM's token-count buckets)."""
    out, x = [], 1
    while True:
        for m in (1, 2, 5):
            if m * x > top:
                return out
            out.append(m * x)
        x *= 10


class Metrics:
    """mixserve's series (`mixserve_*`, the expert-level ones vLLM has no counterpart for) and vLLM's
    (`vllm:*`, same names, types, labels and buckets), so that the Gateway API inference extension's
    endpoint picker, inference-perf, KEDA rules and vLLM's dashboards read this server unchanged.
    Counters are counters (rates are PromQL's), also where the figure comes from the attention
    replicas: each replica's report is added by its increase since its previous report."""

    def __init__(self, model_name: str = "", max_model_len: int = 4096):
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
        self.preemptions = Counter("mixserve_preemptions_total", "Sequences preempted for KV space", registry=r)
        self.routed = Counter(
            "mixserve_expert_routed_tokens_total",
            "Tokens routed to an expert in a layer",
            ["layer", "expert"],
            registry=r,
        )
        self.group_routed = Counter(
            "mixserve_expert_group_routed_tokens_total",
            "Tokens routed to an expert group's experts, summed over layers",
            ["group"],
            registry=r,
        )
        self.expert_calls = Counter("mixserve_expert_layer_calls_total", "Layer fan-outs to the experts", registry=r)
        self.expert_seconds = Counter(
            "mixserve_expert_layer_call_seconds_total", "Summed layer fan-out round-trip time", registry=r
        )
        self.retries = Counter("mixserve_expert_retries_total", "Expert calls re-sent after a failure", registry=r)
        self.engine_seconds = Counter(
            "mixserve_engine_seconds_total",
            "Engine-thread time by phase of a step (schedule, dense, dispatch, wait, combine, sample, output)",
            ["phase"],
            registry=r,
        )
        self.replicas = Gauge("mixserve_expert_replicas", "Running replicas per expert group", ["group"], registry=r)
        self.queued = Gauge(
            "mixserve_expert_queued_tokens", "Tokens sent to an expert and not yet returned", ["expert"], registry=r
        )
        self.replicas_min = Gauge(
            "mixserve_expert_replicas_min", "Lower replica bound of an expert group", ["group"], registry=r
        )
        self.replicas_max = Gauge(
            "mixserve_expert_replicas_max", "Upper replica bound of an expert group", ["group"], registry=r
        )
        self.prefix_queries = Counter(
            "mixserve_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "mixserve_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (not computed)", registry=r
        )
        self.prefix_evictions = Counter(
            "mixserve_prefix_cache_evictions_total", "Cached KV blocks evicted for new ones", registry=r
        )
        self.prefix_blocks = Gauge(
            "mixserve_prefix_cache_blocks", "KV blocks in the prefix cache (held or free)", registry=r
        )
        self.prefix_ratio = Gauge(
            "mixserve_prefix_cache_hit_ratio",
            "Prompt tokens found over tokens looked up, since the replicas started (rates: the counters)",
            registry=r,
        )
        self.stream_stalls = Counter(
            "mixserve_stream_stalls_total",
            "Streams aborted because their client read nothing for server.stream_stall_timeout_s",
            registry=r,
        )
        self.resubmits = Counter(
            "mixserve_attention_resubmits_total",
            "Requests re-submitted to another attention replica after theirs died",
            registry=r,
        )
        # vLLM's names. One engine as vLLM counts it: the attention replicas summed (engine="0").
        labels, self._v = ["model_name", "engine"], (model_name, "0")

        def vllm(kind, name: str, doc: str, **kw):
            return kind(f"vllm:{name}", doc, labels + kw.pop("extra", []), registry=r, **kw)

        self.v_running = vllm(Gauge, "num_requests_running", "Number of requests in model execution batches.")
        self.v_waiting = vllm(Gauge, "num_requests_waiting", "Number of requests waiting to be processed.")
        self.v_kv = vllm(Gauge, "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.v_kv_old = vllm(Gauge, "gpu_cache_usage_perc", "KV-cache usage (vLLM's older name).")
        self.v_preemptions = vllm(Counter, "num_preemptions", "Cumulative number of preemption from the engine.")
        self.v_prefix_queries = vllm(Counter, "prefix_cache_queries", "Prefix cache queries, in terms of tokens.")
        self.v_prefix_hits = vllm(Counter, "prefix_cache_hits", "Prefix cache hits, in terms of tokens.")
        self.v_prompt = vllm(Counter, "prompt_tokens", "Number of prefill tokens processed.")
        self.v_generation = vllm(Counter, "generation_tokens", "Number of generation tokens processed.")
        self.v_success = vllm(
            Counter, "request_success", "Count of successfully processed requests.", extra=["finished_reason"]
        )
        self.v_ttft = vllm(Histogram, "time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS)
        self.v_itl = vllm(Histogram, "inter_token_latency_seconds", "Inter-token latency.", buckets=TPOT_BUCKETS)
        self.v_tpot = vllm(
            Histogram,
            "time_per_output_token_seconds",
            "Time per output token (vLLM's older name).",
            buckets=TPOT_BUCKETS,
        )
        self.v_e2e = vllm(Histogram, "e2e_request_latency_seconds", "End-to-end request latency.", buckets=E2E_BUCKETS)
        tokens = buckets_1_2_5(max_model_len)
        self.v_req_prompt = vllm(Histogram, "request_prompt_tokens", "Prompt tokens per request.", buckets=tokens)
        self.v_req_gen = vllm(Histogram, "request_generation_tokens", "Generated tokens per request.", buckets=tokens)
        self._seen: dict[tuple, dict] = {}  # attention replica -> its counters at its previous report
        self.groups: list[list[int]] = []

    # ------------------------------------------------------------ request side (the ingress counts)

    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.v_prompt.labels(*self._v).inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.v_ttft.labels(*self._v).observe(seconds)

    def tokens(self, n: int, per_token_s: float | None) -> None:
        """`n` tokens generated; `per_token_s`: the time since the previous ones, per token."""
        self.generated_tokens.inc(n)
        self.v_generation.labels(*self._v).inc(n)
        if per_token_s is not None:
            self.itl.observe(per_token_s)
            self.v_itl.labels(*self._v).observe(per_token_s)
            self.v_tpot.labels(*self._v).observe(per_token_s)

    def finished(self, reasons: list[str], seconds: float, prompt_tokens: int, generated: int) -> None:
        """A request has ended: its choices' finish reasons, its latency and token counts."""
        for reason in reasons:
            self.v_success.labels(*self._v, reason).inc()
        self.v_e2e.labels(*self._v).observe(seconds)
        self.v_req_prompt.labels(*self._v).observe(prompt_tokens)
        self.v_req_gen.labels(*self._v).observe(generated)

    # ------------------------------------------------------------ engine side (the attention replicas report)

    def set_bounds(self, groups: list[list[int]], bounds: list[tuple[int, int]]) -> None:
        """The expert groups (expert ids of each) and their replica bounds, from the config."""
        self.groups = groups
        for g, (lo, hi) in enumerate(bounds):
            self.replicas_min.labels(str(g)).set(lo)
            self.replicas_max.labels(str(g)).set(hi)

    def update_from(self, reports: dict[tuple, AttentionStats], replicas: dict[str, int]) -> None:
        """The attention replicas' latest reports (by replica): gauges from their sum, counters by each
        replica's increase since its previous report (a new replica counts from zero)."""
        s = AttentionStats.summed(list(reports.values()))
        for mine, theirs, value in (
            (self.running, self.v_running, s.running),
            (self.waiting, self.v_waiting, s.waiting),
            (self.kv_usage, self.v_kv, s.kv_usage),
        ):
            mine.set(value)
            theirs.labels(*self._v).set(value)
        self.v_kv_old.labels(*self._v).set(s.kv_usage)
        self.prefix_blocks.set(s.prefix_cached_blocks)
        self.prefix_ratio.set(s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0)
        self.queued.clear()
        for e, n in s.expert_in_flight_tokens.items():
            self.queued.labels(str(e)).set(n)
        group_of = {e: g for g, es in enumerate(self.groups) for e in es}
        for key, st in reports.items():
            now = {
                "preemptions": st.preemptions,
                "calls": st.expert_calls,
                "seconds": st.expert_call_seconds,
                "retries": st.expert_retries,
                "prefix_queries": st.prefix_queries,
                "prefix_hits": st.prefix_hits,
                "prefix_evictions": st.prefix_evictions,
                "routed": {(l, e): n for l, e, n in st.routed_tokens},
                "phases": dict(st.engine_seconds),
            }
            counts = ("preemptions", "calls", "seconds", "retries", "prefix_queries", "prefix_hits", "prefix_evictions")
            before = self._seen.get(key, {**dict.fromkeys(counts, 0), "routed": {}, "phases": {}})
            grew = {k: max(0, now[k] - before[k]) for k in counts}
            self.prefix_queries.inc(grew["prefix_queries"])
            self.v_prefix_queries.labels(*self._v).inc(grew["prefix_queries"])
            self.prefix_hits.inc(grew["prefix_hits"])
            self.v_prefix_hits.labels(*self._v).inc(grew["prefix_hits"])
            self.prefix_evictions.inc(grew["prefix_evictions"])
            self.preemptions.inc(grew["preemptions"])
            self.v_preemptions.labels(*self._v).inc(grew["preemptions"])
            self.expert_calls.inc(grew["calls"])
            self.expert_seconds.inc(grew["seconds"])
            self.retries.inc(grew["retries"])
            for phase, v in now["phases"].items():
                d = v - before["phases"].get(phase, 0.0)
                if d > 0:
                    self.engine_seconds.labels(phase).inc(d)
            for (l, e), n in now["routed"].items():
                d = n - before["routed"].get((l, e), 0)
                if d > 0:
                    self.routed.labels(str(l), str(e)).inc(d)
                    if e in group_of:
                        self.group_routed.labels(str(group_of[e])).inc(d)
            self._seen[key] = now
        for key in [k for k in self._seen if k not in reports]:
            del self._seen[key]
        for g, n in replicas.items():
            self.replicas.labels(g).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
