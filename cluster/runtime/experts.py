"""The one expert runtime: the worker host every expert replica runs, and the client every attention
worker calls it through, whatever hosts them (Ray actors for `mixserve generate` and the benchmark,
Serve replicas for the application).

    attention worker                                          expert replica (ExpertHost)
    ExpertClient.submit(layer batches)                        [ChannelServer] -> ExpertWorker.run
      per group: split into chunks, each to the least-loaded      ^
      live replica over its open channel  ------ TCP frames -------'
      no channel known (starting, transport: ray) -> fleet.fallback: a Ray call (actor or Serve handle)
    future.result(): wait; a broken, hung or draining replica -> re-send the chunk elsewhere

Who the replicas are and where their channels listen comes from a `Fleet`: `ActorFleet`
(cluster/runtime/actors.py, the actors it started) or `ServeFleet` (cluster/serve/experts.py, the
application's expert directory). The client owns dispatch, chunking over replicas, retries and load
accounting; a fleet only answers "which endpoints does group g have" and "send this by Ray instead".
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import time
from typing import Any, NamedTuple, Protocol

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.serve.exceptions import RequestCancelledError

from cluster.config import ExpertsConfig
from cluster.runtime.autoscaling import QUEUED, RATE
from cluster.runtime.channel import ChannelClient, ChannelError, ChannelServer, FrameLimits
from router.dispatch import ExpertRequest
from router.experts import ExpertUnavailable, split_by_group
from workers.expert import ExpertWorker

log = logging.getLogger(__name__)

# Failures after which a call is re-sent elsewhere (calls are idempotent): the replica died, hung,
# is being removed, the connection broke, or the replica is not the one asked (holds other experts,
# or its response does not answer the request: ChannelErrors too). A worker's own error
# (RemoteExpertError) is not one.
RETRYABLE = (
    RayActorError,
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    TimeoutError,
    RequestCancelledError,
    ChannelError,
)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------- the worker host


class ExpertHost:
    """One expert replica: its experts (all layers), its data-plane listener, its load figures.

    Hosted by `ExpertActor` (a Ray actor) or `ExpertDeployment` (a Serve replica); `secret` is the
    data plane's shared key (None, or `transport: ray`: no listener, Ray calls only)."""

    def __init__(
        self,
        model_dir: str,
        experts: list[int],
        dtype: str,
        num_threads: int | None,
        secret: bytes | None,
        cfg: ExpertsConfig,
    ):
        self.worker = ExpertWorker(model_dir, experts, dtype, num_threads, cfg.device)
        self.channel: ChannelServer | None = None
        if cfg.transport == "channel" and secret:
            self.channel = ChannelServer(
                self.worker,
                ray.util.get_node_ip_address(),
                secret,
                FrameLimits.for_worker(self.worker, cfg.max_call_tokens),
                cfg.channel_max_connections,
                cfg.channel_idle_timeout_s,
                cfg.call_timeout_s,
                ports=cfg.channel_ports,
                handshake_timeout_s=cfg.channel_handshake_timeout_s,
                max_handshakes=cfg.channel_max_handshakes,
            )
        self._last = (time.monotonic(), 0)

    def channel_address(self) -> tuple[str, int] | None:
        """Where the listener is; None when there is none or it is draining or closed."""
        ch = self.channel
        return ch.address if ch is not None and not (ch.draining or ch.closed) else None

    def run(self, layer: int, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """A Ray call's answer (transport: ray): host tensors, whatever the worker's device."""
        return {e: y.cpu() for e, y in self.worker.run(layer, batches).items()}

    def info(self) -> dict:
        import resource

        w = self.worker
        return {
            "experts": w.experts,
            "weight_bytes": w.weight_bytes(),
            "bytes_read": w.bytes_read,
            "stats": w.stats.snapshot(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_bytes": rss_bytes(),
            "channel_address": self.channel_address(),
            "channel_connections": self.channel.num_connections if self.channel else 0,
        }

    def load(self) -> dict[str, float]:
        """Load since the last call: routed tokens/s (all layers, every path) and tokens in flight."""
        now, s = time.monotonic(), self.worker.stats
        t0, n0 = self._last
        self._last = (now, s.tokens)
        return {RATE: (s.tokens - n0) / max(now - t0, 1e-6), QUEUED: float(s.in_flight_tokens)}

    def drain(self, timeout_s: float) -> bool:
        """Take no new data-plane calls (callers re-send them elsewhere), finish the ones running, then
        close the listener. True when everything in flight finished within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        if self.channel is not None:
            self.channel.draining = True
        while self.worker.stats.in_flight_tokens > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        done = self.worker.stats.in_flight_tokens == 0
        if self.channel is not None:
            self.channel.close()
        return done


# ---------------------------------------------------------------- the client


class Endpoint(NamedTuple):
    key: str  # the replica, stable across its lifetime
    address: tuple[str, int]  # where its data-plane listener is


class Fleet(Protocol):
    """Where a group's replicas are. `endpoints` must be cheap: it is called on the hot path."""

    def endpoints(self, group: int) -> list[Endpoint]: ...

    def fallback(self, group: int, layer: int, part: dict[int, torch.Tensor], avoid: set[str]) -> Any: ...

    def wait(self, pending: Any, timeout_s: float) -> dict[int, torch.Tensor]: ...

    def cancel(self, pending: Any) -> None: ...

    def broken(self, key: str) -> None: ...


class _Call:
    __slots__ = ("group", "part", "rows", "key", "pending", "tried")

    def __init__(self, group: int, part: dict, rows: int, key: str | None, pending: Any, tried: set[str]):
        self.group, self.part, self.rows, self.key, self.pending, self.tried = group, part, rows, key, pending, tried


class ClientFuture:
    def __init__(self, client: ExpertClient, layer: int, calls: list[_Call], sizes: dict[int, int]):
        self.client, self.layer, self.calls, self.sizes = client, layer, calls, sizes
        self.t0 = time.perf_counter()

    def result(self) -> dict[int, torch.Tensor]:
        c = self.client
        parts: dict[int, list[torch.Tensor]] = {}
        try:
            for call in self.calls:
                for e, y in c._wait(call, self.layer).items():
                    parts.setdefault(e, []).append(y)
        finally:
            for call in self.calls:  # calls abandoned by an exception are no longer outstanding either
                c._settle(call)
            for e, n in self.sizes.items():
                c.in_flight[e] -= n
        c.calls += 1
        c.call_seconds += time.perf_counter() - self.t0
        # Chunks of one expert were sent in row order; concatenating restores the batch.
        return {e: ys[0] if len(ys) == 1 else torch.cat(ys) for e, ys in parts.items()}


class ExpertClient:
    """Dispatch, chunking over replicas, retries and load accounting for one attention worker.

    Used from one thread (the engine loop). Each chunk goes to the group's live replica with the
    fewest rows outstanding from this client (ties in turn), over one persistent connection per
    replica; a replica whose channel fails is skipped for a back-off that doubles while it keeps
    failing. Where a group has no usable channel, the chunk goes through Ray (`fleet.fallback`)."""

    BACKOFF_S = (1.0, 60.0)

    def __init__(
        self,
        fleet: Fleet,
        expert_map: dict[int, int],
        cfg: ExpertsConfig,
        secret: bytes | None,
        device: str = "cpu",
    ):
        """`device`: the attention side's, where the experts' outputs are wanted (the channels stage
        through pinned memory for a CUDA device)."""
        self.fleet, self.expert_map, self.cfg, self.secret = fleet, expert_map, cfg, secret
        self.device = device
        self.channels: dict[str, ChannelClient] = {}
        self.probes: dict[str, tuple[tuple, concurrent.futures.Future]] = {}  # replica -> reconnect under way
        self._reconnector: concurrent.futures.ThreadPoolExecutor | None = None
        self.outstanding: dict[str, int] = {}  # replica -> rows sent by this client and not yet back
        self.bad: dict[str, tuple[tuple, float, int]] = {}  # replica -> (address, skip until, strikes)
        self._turn = itertools.count()
        # Load accounting, read by stats() and the benchmark.
        self.routed: dict[tuple[int, int], int] = {}  # (layer, expert) -> tokens sent
        self.in_flight: dict[int, int] = {}  # expert -> tokens sent and not yet returned
        self.retries = 0
        self.calls, self.call_seconds = 0, 0.0  # layer fan-outs and their summed round-trip time
        self.chunks_sent = 0
        self.channel_calls = self.ray_calls = 0

    # ---- choosing a replica

    def _usable(self, ep: Endpoint, now: float) -> bool:
        b = self.bad.get(ep.key)
        return b is None or b[0] != ep.address or b[1] <= now  # a new address (restarted replica) is a fresh start

    def _mark_bad(self, key: str, address: tuple) -> None:
        _, _, strikes = self.bad.get(key, ((), 0.0, 0))
        lo, hi = self.BACKOFF_S
        self.bad[key] = (address, time.monotonic() + min(hi, lo * 2**strikes), strikes + 1)
        ch = self.channels.pop(key, None)
        if ch is not None:
            ch.close()
        self.fleet.broken(key)

    def _channel(self, group: int, avoid: set[str]) -> tuple[Endpoint, ChannelClient] | None:
        if self.secret is None or self.cfg.transport != "channel":
            return None
        now = time.monotonic()
        eps = [ep for ep in self.fleet.endpoints(group) if ep.key not in avoid and self._usable(ep, now)]
        if not eps:
            return None
        k = next(self._turn) % len(eps)
        for ep in sorted(eps[k:] + eps[:k], key=lambda ep: self.outstanding.get(ep.key, 0)):
            ch = self.channels.get(ep.key)
            if ch is not None and ch.alive and ch.address == tuple(ep.address):
                return ep, ch
            if ep.key in self.bad:  # it failed before: reconnect off the engine's thread, use others meanwhile
                ch = self._probed(ep)
                if ch is None:
                    continue
            else:  # first contact: connect here (a replica that has just registered is listening)
                try:
                    ch = ChannelClient(ep.address, self.cfg.call_timeout_s, self.secret, self.device)
                except (ChannelError, OSError) as e:
                    log.warning("expert channel unavailable", extra={"replica": ep.key, "error": str(e)})
                    self._mark_bad(ep.key, ep.address)
                    continue
            self.channels[ep.key] = ch
            return ep, ch
        return None

    def _probed(self, ep: Endpoint) -> ChannelClient | None:
        """The channel of a reconnect attempt to a replica that failed before, once it has connected; the
        attempt runs in a thread, so a host cut off from the network (connects time out) never stalls
        the engine loop. None while it runs; a failed attempt backs off again."""
        if self._reconnector is None:
            self._reconnector = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="expert-reconnect")
        pending = self.probes.get(ep.key)
        if pending is not None and pending[0] != tuple(ep.address):  # the replica moved: drop the old attempt
            pending[1].add_done_callback(_close_connected)
            pending = None
        if pending is None:
            fut = self._reconnector.submit(ChannelClient, ep.address, self.cfg.call_timeout_s, self.secret)
            self.probes[ep.key] = (tuple(ep.address), fut)
            return None
        if not pending[1].done():
            return None
        del self.probes[ep.key]
        try:
            return pending[1].result()
        except (ChannelError, OSError) as e:
            log.warning("expert channel still unavailable", extra={"replica": ep.key, "error": str(e)})
            self._mark_bad(ep.key, ep.address)
            return None

    def _send(self, group: int, layer: int, part: dict[int, torch.Tensor], rows: int, tried: set[str]) -> _Call:
        while (picked := self._channel(group, tried)) is not None:
            ep, ch = picked
            try:
                pending = (ch, ch.send(layer, part))
            except ChannelError:
                self._mark_bad(ep.key, ep.address)
                tried = tried | {ep.key}
                continue
            self.channel_calls += 1
            self.outstanding[ep.key] = self.outstanding.get(ep.key, 0) + rows
            return _Call(group, part, rows, ep.key, pending, tried | {ep.key})
        self.ray_calls += 1
        host = {e: _own(x.cpu()) for e, x in part.items()}  # by value through Ray: host tensors
        return _Call(group, part, rows, None, self.fleet.fallback(group, layer, host, tried), tried)

    def _settle(self, call: _Call) -> None:
        if call.key is not None:
            self.outstanding[call.key] -= call.rows
            call.key = None

    def _wait(self, call: _Call, layer: int) -> dict[int, torch.Tensor]:
        for attempt in range(1, self.cfg.max_tries + 1):
            try:
                if call.key is not None:
                    ch, cid = call.pending
                    out = ch.result(cid)
                    self.bad.pop(call.key, None)
                    return out
                return self.fleet.wait(call.pending, self.cfg.call_timeout_s)
            except RETRYABLE as e:
                self.retries += 1
                log.warning(
                    "expert call failed; re-sending",
                    extra={
                        "group": call.group,
                        "layer": layer,
                        "attempt": attempt,
                        "error": f"{type(e).__name__}: {e}"[:200],
                    },
                )
                if call.key is not None:
                    self._mark_bad(call.key, call.pending[0].address)
                else:
                    self.fleet.cancel(call.pending)
                self._settle(call)
                if attempt == self.cfg.max_tries:
                    raise ExpertUnavailable(
                        f"expert group {call.group} (layer {layer}) failed {attempt} times: {type(e).__name__}: {e}"
                    ) from None
                nxt = self._send(call.group, layer, call.part, call.rows, call.tried)
                call.key, call.pending, call.tried = nxt.key, nxt.pending, nxt.tried
        raise AssertionError("unreachable")

    # ---- the engine's interface

    def chunks(self, part: dict[int, torch.Tensor]) -> list[dict[int, torch.Tensor]]:
        n = sum(int(x.shape[0]) for x in part.values())
        s = self.cfg.split_tokens
        if not s or n <= s:
            return [part]
        out = []
        for e, x in part.items():
            out += [{e: c} for c in torch.split(x, s)]
        return out

    def submit(self, req: ExpertRequest) -> ClientFuture:
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
                rows = sum(int(x.shape[0]) for x in chunk.values())
                calls.append(self._send(g, req.layer, chunk, rows, set()))
        self.chunks_sent += len(calls)
        return ClientFuture(self, req.layer, calls, sizes)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()
        for _, fut in self.probes.values():
            fut.add_done_callback(_close_connected)
        self.probes.clear()
        if self._reconnector is not None:
            self._reconnector.shutdown(wait=False)


def _own(x: torch.Tensor) -> torch.Tensor:
    """`x` in storage of its own: a view (an expert's slice of the layer's gathered rows, a chunk)
    would be pickled with its whole storage, every group's call carrying every row."""
    return x if x.untyped_storage().nbytes() == x.nbytes else x.clone()


def _close_connected(fut: concurrent.futures.Future) -> None:
    """Done-callback of a reconnect attempt nobody will use: close its channel if it connected."""
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


class Refresher:
    """Calls `fn` every `period_s` in a daemon thread until closed; errors are logged, never raised."""

    def __init__(self, fn, period_s: float, name: str):
        self.fn, self.period_s = fn, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.fn()
            except Exception as e:  # noqa: BLE001 - e.g. the directory restarting: try again next period
                log.debug("refresh failed", extra={"error": f"{type(e).__name__}: {e}"[:200]})
            self.stop.wait(self.period_s)

    def close(self) -> None:
        self.stop.set()
