"""Serve deployments of the disaggregated engine: the same worker host and expert client as the Ray-actor
engine (cluster/expert_runtime.py), with Serve keeping the lifecycle.

    ExpertDeployment "expert-group-{g}"  ExpertHost: its experts, all layers, a data-plane listener;
        |  heartbeat: register(replica, group, address) every HEARTBEAT_S
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
"""

from __future__ import annotations

import time

from ray import serve

from model.tiny import resolve_model

from .channel import new_secret
from .expert_runtime import Endpoint, ExpertClient, ExpertHost, ExpertsConfig, Refresher

HEARTBEAT_S = 1.0  # an expert replica re-registers this often
ENTRY_TTL_S = 5.0  # a replica not heard from for this long is out of the view
REFRESH_S = 0.5  # an attention replica reads the view this often


def app_secret() -> bytes:
    """The data plane's key for Serve applications: made once per Ray cluster and kept in Ray's GCS, so
    it is never in an application's arguments or config (an in-place config update then restarts
    nothing) and every replica of every node reads the same one through Ray."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    key, ns = b"channel-secret", b"mixserve"
    _internal_kv_put(key, new_secret(), overwrite=False, namespace=ns)  # the first caller's wins
    return _internal_kv_get(key, namespace=ns)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class ExpertDirectory:
    """Expert replicas announce themselves here; attention replicas read the view. Holds only soft
    state: after a restart the replicas' next heartbeats rebuild it within HEARTBEAT_S."""

    def __init__(self):
        self.entries: dict[str, tuple[int, tuple[str, int], float]] = {}
        self.gone: dict[str, float] = {}  # deregistered replicas: a late heartbeat must not revive them

    def register(self, replica: str, group: int, address: tuple[str, int]) -> None:
        if replica not in self.gone:
            self.entries[replica] = (int(group), (str(address[0]), int(address[1])), time.monotonic())

    def deregister(self, replica: str) -> None:
        self.entries.pop(replica, None)
        self.gone[replica] = time.monotonic()

    def view(self) -> dict[int, list[tuple[str, str, int]]]:
        now = time.monotonic()
        for r, t in list(self.gone.items()):
            if now - t > 10 * ENTRY_TTL_S:
                del self.gone[r]
        out: dict[int, list] = {}
        for r, (g, addr, t) in sorted(self.entries.items()):
            if now - t <= ENTRY_TTL_S:
                out.setdefault(g, []).append((r, *addr))
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertDeployment:
    """One expert group's replica: the worker host, announced to the directory while it serves."""

    def __init__(
        self,
        model_dir: str | None,
        experts: list[int],
        dtype: str = "auto",
        num_threads: int | None = None,
        cfg: dict | None = None,
        group: int = 0,
        directory=None,
    ):
        self.cfg = ExpertsConfig.model_validate(cfg or {})
        secret = app_secret() if directory is not None else None
        self.host = ExpertHost(resolve_model(model_dir), experts, dtype, num_threads, secret, self.cfg)
        self.group, self.directory = group, directory
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.heartbeat = None
        if directory is not None and self.host.channel is not None:
            addr = self.host.channel_address()
            self.heartbeat = Refresher(
                lambda: directory.register.remote(self.replica, group, addr).result(timeout_s=10),
                HEARTBEAT_S,
                "expert-heartbeat",
            )
        self._gauges = None

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
            await asyncio.wait_for(self.directory.deregister.remote(self.replica), timeout=2)
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

    def __init__(self, handles: list, expert_map: dict[int, int], cfg: ExpertsConfig, directory=None):
        use_channel = directory is not None and cfg.transport == "channel"
        super().__init__(
            ServeFleet(handles, directory if use_channel else None),
            expert_map,
            cfg,
            app_secret() if use_channel else None,
        )

    def close(self) -> None:
        self.fleet.close()
        super().close()
