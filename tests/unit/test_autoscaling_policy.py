"""The expert autoscaling policy and its config, without a cluster (the scaling itself under load:
tests/integration/test_autoscaling.py)."""

from __future__ import annotations

import pytest

from cluster.config import EXPERT_POLICY, ExpertAutoscalingConfig
from cluster.runtime.autoscaling import ExpertLoadPolicy, desired_replicas


def test_desired_replicas_follow_rate_and_queue():
    assert desired_replicas([], [], 100, 1e9) == 1
    assert desired_replicas([90.0], [0], 100, 1e9) == 1
    assert desired_replicas([90.0, 60.0], [0, 0], 100, 1e9) == 2
    assert desired_replicas([450.0], [0], 100, 1e9) == 5
    assert desired_replicas([10.0], [700.0], 100, 256) == 3


def test_policy_keeps_target_until_replicas_report():
    class Ctx:
        aggregated_metrics, policy_state, target_num_replicas = {}, {}, 2

    assert ExpertLoadPolicy(100)(Ctx())[0] == 2
    Ctx.aggregated_metrics = {"routed_tokens_per_s": {"r1": 250.0, "r2": 120.0}, "queued_tokens": {"r1": 0.0}}
    want, state = ExpertLoadPolicy(100)(Ctx())
    assert want == 4 and state["mixserve_desired"] == 4


def test_config_bounds_are_validated_and_reach_serve():
    cfg = ExpertAutoscalingConfig(
        tokens_per_s_per_replica=50,
        min_replicas=1,
        max_replicas=3,
        per_group={2: {"min_replicas": 2, "max_replicas": 5}},
    )
    assert cfg.bounds(0) == (1, 3) and cfg.bounds(2) == (2, 5)
    sc = cfg.serve_config(2)
    assert (sc.min_replicas, sc.max_replicas, sc.initial_replicas) == (2, 5, 2)
    assert sc.policy.policy_function == EXPERT_POLICY
    assert sc.policy.policy_kwargs["tokens_per_s_per_replica"] == 50
    with pytest.raises(ValueError, match="max_replicas"):
        ExpertAutoscalingConfig(tokens_per_s_per_replica=1, min_replicas=3, max_replicas=2)
