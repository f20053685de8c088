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

from .autoscaling import QUEUED, RATE


RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError, TimeoutError, RequestCancelledError)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertDeployment:
    def __init__(self, model_dir: str | None, experts: list[int], dtype: str = "auto", num_threads: int | None = None):
        self.worker = ExpertWorker(resolve_model(model_dir), experts, dtype, num_threads)
        self._last = (time.monotonic(), 0)
        self._gauges = None

    def run(self, layer: int, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.worker.run(layer, batches)

    def info(self) -> dict:
        import os

        import ray

        return {"experts": self.worker.experts, "weight_bytes": self.worker.weight_bytes(),
                "bytes_read": self.worker.bytes_read, "stats": self.worker.stats.snapshot(),
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def load(self) -> dict[str, float]:
        """This replica's load since the last call: routed tokens/s (all layers) and tokens in flight."""
        now, s = time.monotonic(), self.worker.stats
        t0, n0 = self._last
        self._last = (now, s.tokens)
        return {RATE: (s.tokens - n0) / max(now - t0, 1e-6), QUEUED: float(s.in_flight_tokens)}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Called by Serve every metrics push interval; ExpertLoadPolicy reads these per replica. The same
        figures go to Ray's metrics endpoint as mixserve_expert_replica_* gauges."""
        load = self.load()
        try:
            if self._gauges is None:
                from ray.util.metrics import Gauge

                tags = ("experts",)
                self._gauges = {k: Gauge(f"mixserve_expert_replica_{k}", f"per replica: {k}", tag_keys=tags) for k in load}
            for k, v in load.items():
                self._gauges[k].set(v, tags={"experts": ",".join(map(str, self.worker.experts))})
        except Exception:  # noqa: BLE001 - metrics export must never fail the autoscaler's call
            pass
        return load


class ServeFuture:
    def __init__(self, backend: "ServeExperts", layer: int, calls: list[tuple]):
        self.backend, self.layer, self.calls = backend, layer, calls
        self.t0 = time.perf_counter()

    def result(self) -> dict[int, torch.Tensor]:
        parts: dict[int, list[torch.Tensor]] = {}
        b = self.backend
        try:
            for g, resp, part in self.calls:
                # A re-send through the handle is routed by Serve to a live replica.
                out = wait_with_retries(
                    resp, lambda r: r.result(timeout_s=b.call_timeout_s),
                    lambda g=g, part=part: b.handles[g].run.remote(self.layer, part),
                    b.max_tries, RETRYABLE, b.on_retry, f"expert group {g} (layer {self.layer})",
                    lambda r: r.cancel(),
                )
                for e, y in out.items():
                    parts.setdefault(e, []).append(y)
        finally:
            b.done(self)
        b.calls += 1
        b.call_seconds += time.perf_counter() - self.t0
        # Chunks of one expert were sent in row order; concatenating restores the batch.
        return {e: ys[0] if len(ys) == 1 else torch.cat(ys) for e, ys in parts.items()}


class ServeExperts:
    """Expert backend over Serve handles: handles[g] reaches expert group g's deployment.

    With `split_tokens`, a group's batch larger than that is sent as several calls of at most
    `split_tokens` rows, which Serve's router spreads over the group's replicas (the ones that are
    ready; a replica being removed gets nothing new)."""

    def __init__(self, handles: list, expert_map: dict[int, int], by_reference: bool = True, max_tries: int = 4,
                 call_timeout_s: float = 30.0, split_tokens: int | None = None):
        self.handles = [h if by_reference else h.options(_by_reference=False) for h in handles]
        self.expert_map = expert_map
        self.max_tries, self.call_timeout_s, self.split_tokens = max_tries, call_timeout_s, split_tokens
        self.retries = 0
        self.routed: dict[tuple[int, int], int] = {}  # (layer, expert) -> tokens sent
        self.in_flight: dict[int, int] = {}  # expert -> tokens sent and not yet returned
        self.pending: dict[int, dict[int, int]] = {}  # id(future) -> its tokens per expert
        self.call_seconds = 0.0  # sum over layer round trips (submit to all results back)
        self.calls = 0
        self.chunks_sent = 0

    def on_retry(self, attempt: int, e: Exception) -> None:
        self.retries += 1

    def done(self, fut: ServeFuture) -> None:
        for e, n in self.pending.pop(id(fut), {}).items():
            self.in_flight[e] -= n

    def chunks(self, part: dict[int, torch.Tensor]) -> list[dict[int, torch.Tensor]]:
        n = sum(int(x.shape[0]) for x in part.values())
        if not self.split_tokens or n <= self.split_tokens:
            return [part]
        out = []
        for e, x in part.items():
            out += [{e: c} for c in torch.split(x, self.split_tokens)]
        return out

    def submit(self, req: ExpertRequest) -> ServeFuture:
        sizes = {}
        for e, x in req.batches.items():
            n = int(x.shape[0])
            key = (req.layer, e)
            self.routed[key] = self.routed.get(key, 0) + n
            self.in_flight[e] = self.in_flight.get(e, 0) + n
            sizes[e] = n
        calls = []
        for g, part in split_by_group(req.batches, self.expert_map).items():
            for chunk in self.chunks(part):
                calls.append((g, self.handles[g].run.remote(req.layer, chunk), chunk))
        self.chunks_sent += len(calls)
        fut = ServeFuture(self, req.layer, calls)
        self.pending[id(fut)] = sizes
        return fut
