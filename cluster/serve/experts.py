"""Serve deployments of the disaggregated engine: the same worker host and expert client as the Ray-actor
engine (cluster/runtime/), with Serve keeping the lifecycle.

    ExpertDeployment "expert-group-{g}"  ExpertHost: its experts, all layers, a data-plane listener;
        |  heartbeat: register(replica, group, host, port, seq, ts, mac) every HEARTBEAT_S
        v
    ExpertDirectory                      which expert replicas are up and where they listen
        ^  view() every REFRESH_S
        |
    ServeExperts (in each AttentionWorker) = ExpertClient over ServeFleet: TCP frames to the replicas;
        where no channel is known (starting up, transport: ray) Serve handles by value carry the call.

Serve places, health-checks, restarts, autoscales and drains the replicas. A replica being removed
deregisters, refuses new frames ("draining": the client re-sends them to another replica at once),
finishes what it has, then closes; one that dies or hangs stops heartbeating and leaves the view after
ENTRY_TTL_S, and the client has already re-sent its calls after the broken connection or the timeout.
The directory and its signed records: cluster/serve/directory.py.
"""

from __future__ import annotations

import itertools
import logging

from ray import serve

from cluster.config import ExpertsConfig
from cluster.runtime.experts import Endpoint, ExpertClient, ExpertHost, Refresher
from cluster.serve.directory import HEARTBEAT_S, REFRESH_S, app_secret, signed
from model.tiny import resolve_model

log = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertDeployment:
    """One expert group's replica: the worker host, announced to the directory while it serves."""

    def __init__(
        self,
        model_dir: str | None,
        experts: list[int],
        dtype: str = "auto",
        num_threads: int | None = None,
        cfg: ExpertsConfig | None = None,
        group: int = 0,
        directory=None,
    ):
        self.cfg = cfg or ExpertsConfig()
        self.secret = app_secret() if directory is not None else None
        self.host = ExpertHost(resolve_model(model_dir), experts, dtype, num_threads, self.secret, self.cfg)
        self.group, self.directory = group, directory
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._seq = itertools.count()  # signed into every directory record: increasing, so none replays
        self.heartbeat = None
        if directory is not None and self.host.channel is not None:
            self.address = self.host.channel_address()
            self.heartbeat = Refresher(self._register, HEARTBEAT_S, "expert-heartbeat")
        self._gauges = None

    def _signed(self, op: str, *fields) -> tuple:
        return signed(self.secret, op, self.replica, *fields, seq=next(self._seq))

    def _register(self) -> None:
        host, port = self.address
        if not self.directory.register.remote(*self._signed("register", self.group, host, port)).result(timeout_s=10):
            log.warning("the expert directory refused this replica's registration (another secret?)")

    def run(self, layer: int, batches: dict) -> dict:
        return self.host.run(layer, batches)

    def info(self) -> dict:
        return {**self.host.info(), "replica": self.replica}

    def load(self) -> dict[str, float]:
        return self.host.load()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Called by Serve every metrics push interval; ExpertLoadPolicy reads these per replica. The same
        figures go to Ray's metrics endpoint as mixserve_expert_replica_* gauges."""
        load = self.load()
        try:
            if self._gauges is None:
                from ray.util.metrics import Gauge

                tags = ("experts",)
                self._gauges = {
                    k: Gauge(f"mixserve_expert_replica_{k}", f"per replica: {k}", tag_keys=tags) for k in load
                }
            for k, v in load.items():
                self._gauges[k].set(v, tags={"experts": ",".join(map(str, self.host.worker.experts))})
        except Exception:  # noqa: BLE001 - metrics export must never fail the autoscaler's call
            pass
        return load

    async def __del__(self):
        """Serve calls this when it removes the replica (scale-down, redeploy, shutdown), after it has
        stopped routing handle calls here: leave the view, refuse new frames, finish the running ones."""
        import asyncio

        if getattr(self, "heartbeat", None) is None:
            return
        self.heartbeat.close()
        try:
            await asyncio.wait_for(self.directory.deregister.remote(*self._signed("deregister")), timeout=2)
        except Exception:  # noqa: BLE001 - the directory may be gone too; the entry then expires
            pass
        # Callers that have not yet seen the new view are refused and re-send elsewhere at once.
        await asyncio.to_thread(self.host.drain, max(0.0, self.cfg.graceful_shutdown_timeout_s - 3))


class ServeFleet:
    """Expert group g's replicas as the directory last listed them; Serve handles (by value) carry a
    call where no channel is known."""

    def __init__(self, handles: list, directory):
        self.handles = [h.options(_by_reference=False) for h in handles]
        self.directory = directory
        self.view: dict[int, list[Endpoint]] = {}
        self.refresher = Refresher(self.refresh, REFRESH_S, "expert-directory") if directory is not None else None

    def refresh(self) -> None:
        got = self.directory.view.remote().result(timeout_s=10)
        self.view = {int(g): [Endpoint(r, (h, p)) for r, h, p in eps] for g, eps in got.items()}  # one atomic swap

    def endpoints(self, group: int) -> list[Endpoint]:
        return self.view.get(group, [])

    def fallback(self, group: int, layer: int, part, avoid: set[str]):
        return self.handles[group].run.remote(layer, part)  # Serve routes it to a live replica

    def wait(self, pending, timeout_s: float):
        return pending.result(timeout_s=timeout_s)

    @staticmethod
    def cancel(pending) -> None:
        pending.cancel()

    def broken(self, key: str) -> None:
        pass  # the directory is the truth; the client backs off from the replica meanwhile

    def close(self) -> None:
        if self.refresher is not None:
            self.refresher.close()


class ServeExperts(ExpertClient):
    """The expert client of an AttentionWorker: handles[g] is expert group g's deployment."""

    def __init__(
        self, handles: list, expert_map: dict[int, int], cfg: ExpertsConfig, directory=None, device: str = "cpu"
    ):
        use_channel = directory is not None and cfg.transport == "channel"
        super().__init__(
            ServeFleet(handles, directory if use_channel else None),
            expert_map,
            cfg,
            app_secret() if use_channel else None,
            device,
        )

    def close(self) -> None:
        self.fleet.close()
        super().close()
