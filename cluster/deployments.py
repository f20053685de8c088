"""Serve deployments of the disaggregated engine, and the expert backend that calls them.

`ExpertDeployment` wraps one expert group's `ExpertWorker` (all layers); `ServeExperts` reaches the
deployments through Serve `DeploymentHandle`s (optionally by value over inter-deployment gRPC,
`_by_reference=False`). Which transport the engine uses is a measured choice: see
`benchmarks/transport.py` and the table in the README.
"""

from __future__ import annotations

import time

import torch
from ray import serve

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import RequestCancelledError

from model.model import ExpertRequest
from model.tiny import resolve_model
from router.experts import split_by_group, wait_with_retries
from workers.expert import ExpertWorker


RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError, TimeoutError, RequestCancelledError)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertDeployment:
    def __init__(self, model_dir: str | None, experts: list[int], dtype: str = "auto", num_threads: int | None = None):
        self.worker = ExpertWorker(resolve_model(model_dir), experts, dtype, num_threads)

    def run(self, layer: int, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.worker.run(layer, batches)

    def info(self) -> dict:
        return {"experts": self.worker.experts, "weight_bytes": self.worker.weight_bytes(),
                "bytes_read": self.worker.bytes_read, "stats": self.worker.stats.snapshot()}


class ServeFuture:
    def __init__(self, backend: "ServeExperts", layer: int, calls: dict[int, tuple]):
        self.backend, self.layer, self.calls = backend, layer, calls
        self.t0 = time.perf_counter()

    def result(self) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        b = self.backend
        for g, (resp, part) in self.calls.items():
            # A re-send through the handle is routed by Serve to a live replica.
            out.update(wait_with_retries(
                resp, lambda r: r.result(timeout_s=b.call_timeout_s),
                lambda g=g, part=part: b.handles[g].run.remote(self.layer, part),
                b.max_tries, RETRYABLE, b.on_retry, f"expert group {g} (layer {self.layer})",
            ))
        b.calls += 1
        b.call_seconds += time.perf_counter() - self.t0
        return out


class ServeExperts:
    """Expert backend over Serve handles: handles[g] reaches expert group g's deployment."""

    def __init__(self, handles: list, expert_map: dict[int, int], by_reference: bool = True, max_tries: int = 4,
                 call_timeout_s: float = 30.0):
        self.handles = [h if by_reference else h.options(_by_reference=False) for h in handles]
        self.expert_map = expert_map
        self.max_tries, self.call_timeout_s = max_tries, call_timeout_s
        self.retries = 0
        self.routed: dict[tuple[int, int], int] = {}  # (layer, expert) -> tokens sent
        self.call_seconds = 0.0  # sum over layer round trips (submit to all results back)
        self.calls = 0

    def on_retry(self, attempt: int, e: Exception) -> None:
        self.retries += 1

    def submit(self, req: ExpertRequest) -> ServeFuture:
        for e, x in req.batches.items():
            key = (req.layer, e)
            self.routed[key] = self.routed.get(key, 0) + int(x.shape[0])
        parts = split_by_group(req.batches, self.expert_map)
        return ServeFuture(self, req.layer, {g: (self.handles[g].run.remote(req.layer, p), p) for g, p in parts.items()})
