"""Expert-replica autoscaling on routed-token load.

    expert replica --record_autoscaling_stats()--> Serve controller --ExpertLoadPolicy(ctx)--> target replicas
        {routed_tokens_per_s, queued_tokens}        (averaged over look_back_period_s per replica)

Mixtral's routing is uneven and bursty, so one hot expert bounds a whole step; each expert group's
deployment gets its own target: enough replicas that each serves at most `tokens_per_s_per_replica`
routed tokens per second and holds at most `queued_tokens_per_replica` tokens in flight. Serve wraps the
policy with the deployment's AutoscalingConfig: the result is clipped to [min_replicas, max_replicas]
(per expert group, from the config) and applied only after upscale_delay_s / downscale_delay_s of
consistent decisions. Replicas that cannot be placed (no node offers their resources) stay pending in
Serve and show up as Ray resource demand, which the Ray autoscaler (KubeRay's in-tree autoscaler) turns
into new nodes of the group that offers those resources.

The policy's settings (`ExpertAutoscalingConfig`) are in cluster/config.py with every other schema.
"""

from __future__ import annotations

import math
from typing import Any

RATE, QUEUED = "routed_tokens_per_s", "queued_tokens"


def desired_replicas(
    rates: list[float], queued: list[float], tokens_per_s_per_replica: float, queued_tokens_per_replica: float
) -> int:
    """Replicas wanted for an expert group whose replicas report these loads (before bounds/delays)."""
    by_rate = math.ceil(sum(rates) / tokens_per_s_per_replica - 1e-9)
    by_queue = math.ceil(sum(queued) / queued_tokens_per_replica - 1e-9)
    return max(1, by_rate, by_queue)


class ExpertLoadPolicy:
    """Serve custom autoscaling policy (class form: Serve instantiates it once with policy_kwargs)."""

    def __init__(self, tokens_per_s_per_replica: float, queued_tokens_per_replica: float = 1e9):
        self.capacity = tokens_per_s_per_replica
        self.queue_capacity = queued_tokens_per_replica

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        rates = list((metrics.get(RATE) or {}).values())
        queued = list((metrics.get(QUEUED) or {}).values())
        state = dict(ctx.policy_state or {})
        if not rates and not queued:  # no report yet (replicas just started): keep the current target
            return ctx.target_num_replicas, state
        want = desired_replicas(rates, queued, self.capacity, self.queue_capacity)
        state.update(mixserve_rate=sum(rates), mixserve_queued=sum(queued), mixserve_desired=want)
        return want, state
