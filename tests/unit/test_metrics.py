"""The ingress's Prometheus registry on its own: counters fed by the attention replicas' reports never go
down and never count a report twice (a replica replaced, a report seen again), vLLM's series carry
vLLM's names and labels, and the text parses."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cluster.api.metrics import AttentionStats, Metrics, buckets_1_2_5


def samples(m: Metrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def report(calls: int, routed: int, preemptions: int = 0, running: int = 0) -> AttentionStats:
    return AttentionStats(
        running=running,
        expert_calls=calls,
        expert_call_seconds=calls / 100,
        preemptions=preemptions,
        routed_tokens=[[0, 1, routed], [1, 3, 2 * routed]],
    )


def test_replica_reports_become_counters_that_never_go_down():
    m = Metrics("tiny", 64)
    m.set_bounds([[0, 1], [2, 3]], [(1, 1), (1, 1)])
    a, b = ("node", 10), ("node", 11)
    m.update_from({a: report(10, 5, 1, running=2), b: report(4, 1)}, {"0": 1})
    first = samples(m)
    assert first[("mixserve_expert_layer_calls_total", ())] == 14
    assert first[("mixserve_expert_routed_tokens_total", (("expert", "1"), ("layer", "0")))] == 6
    assert first[("mixserve_expert_group_routed_tokens_total", (("group", "1"),))] == 12  # expert 3, twice 6
    assert first[("mixserve_running_sequences", ())] == 2
    v = (("engine", "0"), ("model_name", "tiny"))
    assert first[("vllm:num_requests_running", v)] == 2 and first[("vllm:num_preemptions_total", v)] == 1
    m.update_from({a: report(10, 5, 1), b: report(4, 1)}, {"0": 1})  # the same reports again: nothing added
    assert samples(m)[("mixserve_expert_layer_calls_total", ())] == 14
    # replica b replaced by c, which starts from zero: its own counts are added, nothing is taken away
    c = ("node", 12)
    m.update_from({a: report(12, 6, 1), c: report(3, 2)}, {"0": 1})
    after = samples(m)
    assert after[("mixserve_expert_layer_calls_total", ())] == 14 + 2 + 3
    assert after[("mixserve_expert_routed_tokens_total", (("expert", "1"), ("layer", "0")))] == 6 + 1 + 2
    assert all(after[k] >= first[k] for k in first if k[0].endswith("_total"))


def test_request_side_series_with_vllms_labels_and_buckets():
    m = Metrics("tiny", 100)
    m.admitted(7)
    m.first_token(0.03)
    m.tokens(1, None)
    m.tokens(3, 0.01)
    m.finished(["stop", "length"], 0.4, 7, 4)
    got = samples(m)
    v = (("engine", "0"), ("model_name", "tiny"))
    assert got[("vllm:prompt_tokens_total", v)] == 7 and got[("vllm:generation_tokens_total", v)] == 4
    assert (
        got[("vllm:request_success_total", (("engine", "0"), ("finished_reason", "stop"), ("model_name", "tiny")))] == 1
    )
    assert got[("vllm:time_to_first_token_seconds_count", v)] == 1
    assert (
        got[("vllm:inter_token_latency_seconds_count", v)] == 1
        and got[("vllm:e2e_request_latency_seconds_sum", v)] == 0.4
    )
    assert (
        got[("vllm:time_to_first_token_seconds_bucket", tuple(sorted((*v, ("le", "0.04")))))] == 1
    )  # vLLM's bucket bounds
    assert got[("vllm:request_prompt_tokens_bucket", tuple(sorted((*v, ("le", "10.0")))))] == 1
    assert buckets_1_2_5(100) == [1, 2, 5, 10, 20, 50, 100]


def test_prefix_cache_series_count_each_replicas_increase():
    m = Metrics("tiny", 64)
    a, b = ("node", 1), ("node", 2)

    def st(q, h, ev, blocks):
        return AttentionStats(prefix_queries=q, prefix_hits=h, prefix_evictions=ev, prefix_cached_blocks=blocks)

    m.update_from({a: st(100, 40, 1, 5), b: st(50, 10, 0, 3)}, {})
    m.update_from({a: st(160, 88, 2, 6), b: st(50, 10, 0, 3)}, {})
    got = samples(m)
    v = (("engine", "0"), ("model_name", "tiny"))
    assert got[("mixserve_prefix_cache_queries_total", ())] == got[("vllm:prefix_cache_queries_total", v)] == 210
    assert got[("mixserve_prefix_cache_hits_total", ())] == got[("vllm:prefix_cache_hits_total", v)] == 98
    assert got[("mixserve_prefix_cache_evictions_total", ())] == 2
    assert got[("mixserve_prefix_cache_blocks", ())] == 9
    assert abs(got[("mixserve_prefix_cache_hit_ratio", ())] - 98 / 210) < 1e-9
