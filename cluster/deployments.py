"""Serve deployments of the disaggregated engine: the same worker host and expert client as the Ray-actor
engine (cluster/expert_runtime.py), with Serve keeping the lifecycle.

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

Any Ray caller can reach the directory, so a registration (and a deregistration) carries an HMAC of
its record under the data plane's secret (`app_secret`, which the directory reads the same way); a
per-replica sequence number and a timestamp make a recorded one useless to replay.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import time

from ray import serve

from model.tiny import resolve_model

from .channel import new_secret
from .expert_runtime import Endpoint, ExpertClient, ExpertHost, ExpertsConfig, Refresher

HEARTBEAT_S = 1.0  # an expert replica re-registers this often
ENTRY_TTL_S = 5.0  # a replica not heard from for this long is out of the view
REFRESH_S = 0.5  # an attention replica reads the view this often
SIGNED_WINDOW_S = 30.0  # a directory record signed further off than this (wall clock, any node) is refused

log = logging.getLogger(__name__)


def app_secret() -> bytes:
    """The data plane's key for Serve applications: made once per Ray cluster and kept in Ray's GCS, so
    it is never in an application's arguments or config (an in-place config update then restarts
    nothing) and every replica of every node reads the same one through Ray."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    key, ns = b"channel-secret", b"mixserve"
    _internal_kv_put(key, new_secret(), overwrite=False, namespace=ns)  # the first caller's wins
    return _internal_kv_get(key, namespace=ns)


def _record_mac(secret: bytes, op: str, replica, fields: tuple, seq, ts) -> bytes:
    # JSON: one unambiguous encoding of the record, whatever its strings hold and whatever types it came in.
    msg = json.dumps([op, replica, *fields, seq, ts]).encode()
    return hmac.new(secret, b"mxdir-" + msg, hashlib.sha256).digest()


def signed(secret: bytes, op: str, replica: str, *fields, seq: int, ts: float | None = None) -> tuple:
    """The arguments of `ExpertDirectory.<op>` for this record: (replica, *fields, seq, ts, mac)."""
    ts = time.time() if ts is None else ts
    return (replica, *fields, seq, ts, _record_mac(secret, op, replica, fields, seq, ts))


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class ExpertDirectory:
    """Expert replicas announce themselves here; attention replicas read the view. Holds only soft
    state: after a restart the replicas' next heartbeats rebuild it within HEARTBEAT_S."""

    def __init__(self):
        self.secret = app_secret()
        self.entries: dict[str, tuple[int, tuple[str, int], float]] = {}
        self.gone: dict[str, float] = {}  # deregistered replicas: a late heartbeat must not revive them
        self.seqs: dict[str, int] = {}  # replica -> last sequence number taken: a replayed record is old
        self.refused = 0  # records without a valid MAC, stale or replayed

    def _verified(self, op: str, replica, fields: tuple, seq, ts, mac) -> bool:
        """The MAC is checked over the values as they came, before any other use of them: once it
        holds, they are what a holder of the secret signed (a str, ints, a float)."""
        try:
            want = _record_mac(self.secret, op, replica, fields, seq, ts)
            ok = isinstance(mac, bytes) and hmac.compare_digest(mac, want)
            ok = ok and abs(time.time() - ts) <= SIGNED_WINDOW_S and seq > self.seqs.get(replica, -1)
        except (TypeError, ValueError, RecursionError):  # any Ray caller can send anything
            ok = False
        if not ok:
            self.refused += 1
            return False
        self.seqs[replica] = seq
        return True

    def register(self, replica: str, group: int, host: str, port: int, seq: int, ts: float, mac: bytes) -> bool:
        """True when the record is signed with the secret, fresh and newer than the replica's last."""
        if not self._verified("register", replica, (group, host, port), seq, ts, mac):
            return False
        if replica not in self.gone:
            self.entries[replica] = (group, (host, port), time.monotonic())
        return True

    def deregister(self, replica: str, seq: int, ts: float, mac: bytes) -> bool:
        if not self._verified("deregister", replica, (), seq, ts, mac):
            return False
        self.entries.pop(replica, None)
        self.gone[replica] = time.monotonic()
        return True

    def view(self) -> dict[int, list[tuple[str, str, int]]]:
        now = time.monotonic()
        # Long gone: forget them, sequence numbers too (their records are well past SIGNED_WINDOW_S by now).
        for r, t in list(self.gone.items()):
            if now - t > 10 * ENTRY_TTL_S:
                del self.gone[r]
                self.seqs.pop(r, None)
        for r, (_, _, t) in list(self.entries.items()):
            if now - t > 10 * ENTRY_TTL_S:
                del self.entries[r]
                self.seqs.pop(r, None)
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
