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
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

POLICY_PATH = "cluster.autoscaling:ExpertLoadPolicy"
RATE, QUEUED = "routed_tokens_per_s", "queued_tokens"


class ReplicaBounds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(..., ge=1)
    max_replicas: int = Field(..., ge=1)


class ExpertAutoscalingConfig(BaseModel):
    """`experts.autoscaling` in the config; absent = a fixed `experts.replicas` per group."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, description="Replicas of every expert group at the least.")
    max_replicas: int = Field(4, ge=1, description="Replicas of every expert group at the most.")
    per_group: dict[int, ReplicaBounds] = Field(
        default_factory=dict,
        description="Bounds for single expert groups (the expert id when experts_per_worker is 1).",
    )
    tokens_per_s_per_replica: float = Field(
        ..., gt=0, description="Routed tokens per second (summed over layers) one replica should serve."
    )
    queued_tokens_per_replica: float = Field(
        1e9, gt=0, description="Tokens in flight per replica beyond which another replica is wanted."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Consistent upscale decisions needed for this long.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Consistent downscale decisions needed for this long.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window the replicas' load is averaged over.")

    @model_validator(mode="after")
    def _bounds(self):
        for g, b in [("*", self), *self.per_group.items()]:
            if b.max_replicas < b.min_replicas:
                raise ValueError(f"group {g}: max_replicas ({b.max_replicas}) < min_replicas ({b.min_replicas})")
        return self

    def bounds(self, group: int) -> tuple[int, int]:
        b = self.per_group.get(group, self)
        return b.min_replicas, b.max_replicas

    def serve_config(self, group: int):
        """The deployment's Serve AutoscalingConfig, built as Ray's own model (no dict keys to mistype)."""
        from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

        lo, hi = self.bounds(group)
        # Serve wants the look-back window longer than its (deprecated) metrics interval (10 s).
        short = {"metrics_interval_s": self.look_back_period_s / 2} if self.look_back_period_s <= 10 else {}
        return AutoscalingConfig(
            **short,
            min_replicas=lo,
            max_replicas=hi,
            initial_replicas=lo,
            upscale_delay_s=self.upscale_delay_s,
            downscale_delay_s=self.downscale_delay_s,
            look_back_period_s=self.look_back_period_s,
            policy=AutoscalingPolicy(
                policy_function=POLICY_PATH,
                policy_kwargs={
                    "tokens_per_s_per_replica": self.tokens_per_s_per_replica,
                    "queued_tokens_per_replica": self.queued_tokens_per_replica,
                },
            ),
        )


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
