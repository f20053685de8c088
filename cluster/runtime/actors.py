"""The disaggregated engine on a Ray cluster without Serve: expert replicas as Ray actors (`ExpertActor`,
the one worker host) reached through `RayExperts` (the one expert client over `ActorFleet`).
`cluster.build.ray_engine` builds an engine on it (`mixserve generate`, the benchmark); the Serve
application uses the same host and client (cluster/serve/experts.py), only its fleet differs.

    attention (this process)                        expert actors (one per group x replica)
    [gate -> dispatch] --TCP frames (channel)-------> [ChannelServer -> ExpertWorker.run]
                       --run.remote (fallback, transport: ray)-->
    [combine] <---------------- {e: y_e} -------------

A call whose replica died or timed out is re-sent to another replica of the group, or to the
restarted one; calls are idempotent, so the step's result is unchanged. Only after `max_tries` does
it fail.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ExpertsConfig
from cluster.runtime.channel import new_secret
from cluster.runtime.experts import RETRYABLE, Endpoint, ExpertClient, ExpertHost
from router.experts import expert_map

log = logging.getLogger(__name__)


@ray.remote
class ExpertActor(ExpertHost):
    """An expert replica as a plain Ray actor (the worker host, nothing added)."""

    def run_packed(self, payload: tuple[int, dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """One-argument form for Ray Compiled Graphs, whose nodes take one input each."""
        return self.run(*payload)


class ActorFleet:
    """The expert actors this process started: `replicas[g]` are group g's. Channel addresses are
    looked up through Ray (again after a channel breaks: the actor may have been restarted)."""

    def __init__(self, replicas: list[list], transport: str):
        self.replicas, self.transport = replicas, transport
        self.known: dict[str, Endpoint] = {}
        self.lookups: dict[str, ray.ObjectRef] = {}
        self._rr = [itertools.count() for _ in replicas]
        if transport == "channel":
            for g, reps in enumerate(replicas):
                for r, a in enumerate(reps):
                    self.lookups[f"{g}/{r}"] = a.channel_address.remote()

    def endpoints(self, group: int) -> list[Endpoint]:
        out = []
        for r in range(len(self.replicas[group])):
            key = f"{group}/{r}"
            ref = self.lookups.get(key)
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                del self.lookups[key]
                try:
                    addr = ray.get(ref)
                except RETRYABLE:  # died before answering: ask the restarted actor
                    self.lookups[key] = self.replicas[group][r].channel_address.remote()
                    continue
                if addr is None:  # drained, or the lookup failed: no channel (Ray calls reach it still)
                    self.known.pop(key, None)
                else:
                    self.known[key] = Endpoint(key, tuple(addr))
            if key in self.known:
                out.append(self.known[key])
        return out

    def broken(self, key: str) -> None:
        self.known.pop(key, None)
        if key not in self.lookups:
            g, r = map(int, key.split("/"))
            self.lookups[key] = self.replicas[g][r].channel_address.remote()

    def fallback(self, group: int, layer: int, part, avoid: set[str]):
        reps = self.replicas[group]
        order = [next(self._rr[group]) % len(reps) for _ in range(len(reps))]
        r = next((i for i in order if f"{group}/{i}" not in avoid), order[0])
        return reps[r].run.remote(layer, part)

    def wait(self, pending, timeout_s: float):
        return ray.get(pending, timeout=timeout_s)

    @staticmethod
    def cancel(pending) -> None:
        ray.cancel(pending)  # if it has not started yet; a running call finishes for nobody


class RayExperts(ExpertClient):
    """The expert client over expert actors started here (`mixserve generate`, the benchmark)."""

    def __init__(
        self,
        model_dir: str,
        groups: list[list[int]],
        dtype: str = "auto",
        cfg: ExpertsConfig | None = None,
        device: str = "cpu",
    ):
        """`device`: the attention side's (where outputs are wanted); the actors' is `cfg.device`."""
        c = cfg or ExpertsConfig()
        self.groups = groups
        self.placement_groups = []
        secret = new_secret()  # the data plane's: handed to each actor by Ray, never logged
        bundle = {"CPU": c.num_cpus, "GPU": c.num_gpus, **c.resources}
        bundle = {k: v for k, v in bundle.items() if v > 0}
        replicas = []
        for g in self.groups:
            opts = dict(
                num_cpus=c.num_cpus, num_gpus=c.num_gpus, resources=dict(c.resources), max_restarts=c.max_restarts
            )
            if bundle and c.replicas > 1:
                # One bundle per replica, on different nodes where possible (best-effort spread).
                pg = placement_group([dict(bundle) for _ in range(c.replicas)], strategy="SPREAD")
                self.placement_groups.append(pg)
                actors = [
                    ExpertActor.options(
                        **opts, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                    ).remote(model_dir, g, dtype, c.num_threads, secret, c)
                    for i in range(c.replicas)
                ]
            else:
                actors = [
                    ExpertActor.options(**opts).remote(model_dir, g, dtype, c.num_threads, secret, c)
                    for _ in range(c.replicas)
                ]
            replicas.append(actors)
        self.replicas = replicas
        super().__init__(ActorFleet(replicas, c.transport), expert_map(groups), c, secret, device)

    def wait_ready(self, timeout_s: float = 300) -> list[dict]:
        return ray.get([a.info.remote() for reps in self.replicas for a in reps], timeout=timeout_s)

    def shutdown(self) -> None:
        self.close()
        for reps in self.replicas:
            for a in reps:
                ray.kill(a, no_restart=True)
        for pg in self.placement_groups:
            remove_placement_group(pg)


@dataclass
class Runtime:
    experts: RayExperts
    started_ray: bool

    def shutdown(self) -> None:
        self.experts.shutdown()
        if self.started_ray:
            ray.shutdown()


def ensure_ray() -> bool:
    """Join RAY_ADDRESS when set, else start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    # a local Ray as `mixserve serve` starts it: without the dashboard (cluster/cli.py)
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        log_to_driver=False,
        logging_level=logging.WARNING,
        include_dashboard=False,
    )
    return True
