"""The disaggregated engine on Ray: expert workers as Ray actors, reached through `RayExperts`.

    attention (this process)                     expert actors (one per group x replica)
    [gate -> dispatch] --run.remote(layer, {e: x_e})--> [ExpertWorker.run: one SwiGLU per expert]
    [combine] <------------------- {e: y_e} -----------

Every group that has tokens gets one call per layer, all in flight at once. With `transport: channel`
(the default) the batches go over a persistent TCP connection to each replica (cluster/channel.py)
and Ray is the control plane and the fallback; with `transport: ray` every call is a Ray actor call.
A call that fails because its replica died (or timed out) is re-sent to the next replica of the
group, or to the restarted one; calls are idempotent, so the step's result is unchanged. Only after
`max_tries` does it fail.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Literal

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model.checkpoint import Checkpoint
from model.model import ExpertRequest, MixtralDense
from model.tokenizer import Tokenizer
from router.engine import EngineConfig, LLMEngine
from router.experts import expert_groups, split_by_group, wait_with_retries
from workers.expert import ExpertWorker

from .autoscaling import ExpertAutoscalingConfig
from .channel import ChannelClient, ChannelError, ChannelServer, FrameLimits, new_secret

log = logging.getLogger(__name__)

RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError, GetTimeoutError, ChannelError)


class ExpertsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experts_per_worker: int = Field(1, ge=1, description="Experts held by one worker (all layers).")
    replicas: int = Field(1, ge=1, description="Replicas of each expert group.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per expert replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per expert replica (0 on CPU clusters).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica, e.g. {expert_slot: 1}, placing it on expert nodes."
    )
    num_threads: int | None = Field(None, ge=1, description="torch threads per replica (default: torch's).")
    max_tries: int = Field(4, ge=1, description="Attempts of one expert call before the request fails.")
    call_timeout_s: float = Field(30.0, gt=0, description="Seconds to wait for one expert call before retrying.")
    max_restarts: int = Field(-1, ge=-1, description="Ray restarts of a dead replica (-1 = always).")
    autoscaling: ExpertAutoscalingConfig | None = Field(
        None, description="Scale each expert group's replicas on routed-token load (Serve app); null = fixed `replicas`."
    )
    split_tokens: int | None = Field(
        None, ge=1, description="Split one layer's batch for a group into calls of at most this many tokens, "
        "so that Serve spreads a hot expert's batch over its replicas; null = one call per group and layer.",
    )
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="A replica being removed gets nothing new and this long to finish its calls.",
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Calls one expert replica of the Serve app takes at once (Serve's default is 5; "
        "each attention replica has up to num_microbatches x split chunks in flight per group).",
    )
    max_call_tokens: int = Field(
        16384, ge=1, description="Token rows one expert call may carry (all its experts together); the data plane "
        "refuses larger frames before allocating. At least engine.max_num_batched_tokens x top-k.",
    )
    channel_max_connections: int = Field(64, ge=1, description="Data-plane connections one expert replica accepts.")
    channel_idle_timeout_s: float = Field(600.0, gt=0, description="A data-plane connection idle this long is closed.")
    transport: Literal["channel", "ray"] = Field(
        "channel", description="How token batches reach expert actors: `channel` = a direct TCP connection per "
        "replica (Ray as control plane and fallback), `ray` = one Ray actor call per group and layer. "
        "Used by the Ray-actor engine (`start_disaggregated`); the Serve app routes through Serve handles.",
    )


@ray.remote
class ExpertActor:
    """A thin Ray wrapper around `ExpertWorker`."""

    def __init__(self, model_dir: str, experts: list[int], dtype: str, num_threads: int | None, secret: bytes,
                 cfg: ExpertsConfig):
        self.worker = ExpertWorker(model_dir, experts, dtype, num_threads)
        self.channel = ChannelServer(
            self.worker, ray.util.get_node_ip_address(), secret, FrameLimits.for_worker(self.worker, cfg.max_call_tokens),
            cfg.channel_max_connections, cfg.channel_idle_timeout_s, cfg.call_timeout_s,
        )

    def channel_address(self) -> tuple[str, int]:
        return self.channel.address

    def run(self, layer: int, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.worker.run(layer, batches)

    def run_packed(self, payload: tuple[int, dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """One-argument form for Ray Compiled Graphs, whose nodes take one input each."""
        return self.worker.run(*payload)

    def info(self) -> dict:
        import resource

        return {
            "experts": self.worker.experts,
            "weight_bytes": self.worker.weight_bytes(),
            "bytes_read": self.worker.bytes_read,
            "stats": self.worker.stats.snapshot(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_bytes": rss_bytes(),
        }


def rss_bytes() -> int:
    """Current resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class RayFuture:
    def __init__(self, backend: "RayExperts", layer: int, calls: dict[int, tuple]):
        self.backend, self.layer, self.calls = backend, layer, calls
        self.t0 = time.perf_counter()

    def result(self) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        b = self.backend
        for g, (pending, part, replica) in self.calls.items():
            tried = [replica]

            def resend(g=g, part=part, tried=tried):  # through Ray: the channel may be what broke
                tried.append(b.next_replica(g, avoid=tried[-1]))
                return b.replicas[g][tried[-1]].run.remote(self.layer, part)

            out.update(wait_with_retries(
                pending, b.wait, resend, b.cfg.max_tries, RETRYABLE,
                b.on_retry, f"expert group {b.groups[g]} (layer {self.layer})", b.cancel,
            ))
        b.calls += 1
        b.call_seconds += time.perf_counter() - self.t0
        return out


class RayExperts:
    """Expert backend whose workers are Ray actors: `replicas[g]` are the actors of group g."""

    def __init__(self, model_dir: str, num_experts: int, dtype: str = "auto", cfg: ExpertsConfig | None = None):
        self.cfg = cfg or ExpertsConfig()
        c = self.cfg
        self.groups = expert_groups(num_experts, c.experts_per_worker)
        self.expert_map = {e: gi for gi, g in enumerate(self.groups) for e in g}
        self.placement_groups = []
        self.replicas: list[list] = []
        self.secret = new_secret()  # the data plane's: handed to each actor by Ray, never logged
        bundle = {"CPU": c.num_cpus, "GPU": c.num_gpus, **c.resources}
        bundle = {k: v for k, v in bundle.items() if v > 0}
        for g in self.groups:
            opts = dict(num_cpus=c.num_cpus, num_gpus=c.num_gpus, resources=dict(c.resources), max_restarts=c.max_restarts)
            if bundle and c.replicas > 1:
                # One bundle per replica, on different nodes where possible (best-effort spread).
                pg = placement_group([dict(bundle) for _ in range(c.replicas)], strategy="SPREAD")
                self.placement_groups.append(pg)
                actors = [
                    ExpertActor.options(
                        **opts, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                    ).remote(model_dir, g, dtype, c.num_threads, self.secret, c)
                    for i in range(c.replicas)
                ]
            else:
                actors = [ExpertActor.options(**opts).remote(model_dir, g, dtype, c.num_threads, self.secret, c)
                          for _ in range(c.replicas)]
            self.replicas.append(actors)
        self._rr = [itertools.count() for _ in self.groups]
        self.retries = 0
        self.calls, self.call_seconds = 0, 0.0  # layer fan-outs and their summed round-trip time
        # Data plane: (group, replica) -> open channel; and the address lookups in flight.
        self.channels: dict[tuple[int, int], ChannelClient] = {}
        self.addresses: dict[tuple[int, int], ray.ObjectRef] = {}
        self.channel_calls = self.ray_calls = 0
        if c.transport == "channel":
            for g, reps in enumerate(self.replicas):
                for r, a in enumerate(reps):
                    self.addresses[(g, r)] = a.channel_address.remote()

    def channel(self, g: int, r: int) -> ChannelClient | None:
        """The open channel to replica r of group g, or None (use a Ray call this time). A broken
        channel is replaced once the (possibly restarted) actor answers a new address lookup."""
        if self.cfg.transport != "channel":
            return None
        ch = self.channels.get((g, r))
        if ch is not None and ch.alive:
            return ch
        ref = self.addresses.get((g, r))
        if ref is None:
            self.addresses[(g, r)] = self.replicas[g][r].channel_address.remote()
            return None
        if not ray.wait([ref], timeout=0)[0]:
            return None
        del self.addresses[(g, r)]
        try:
            self.channels[(g, r)] = ch = ChannelClient(ray.get(ref), self.cfg.call_timeout_s, self.secret)
        except (OSError, *RETRYABLE) as e:
            log.warning("expert channel unavailable; using Ray calls", extra={"group": g, "error": type(e).__name__})
            return None
        return ch

    def wait(self, pending):
        if isinstance(pending, tuple):  # (channel, call id)
            return pending[0].result(pending[1])
        return ray.get(pending, timeout=self.cfg.call_timeout_s)

    @staticmethod
    def cancel(pending) -> None:
        """A timed-out call: a channel call was cancelled when its connection closed; a Ray call is
        cancelled if it has not started yet."""
        if not isinstance(pending, tuple):
            ray.cancel(pending)

    def on_retry(self, attempt: int, e: Exception) -> None:
        self.retries += 1
        log.warning("expert call failed; re-sending", extra={"attempt": attempt, "error": type(e).__name__})

    def wait_ready(self, timeout_s: float = 300) -> list[dict]:
        return ray.get([a.info.remote() for reps in self.replicas for a in reps], timeout=timeout_s)

    def next_replica(self, g: int, avoid: int | None = None) -> int:
        n = len(self.replicas[g])
        i = next(self._rr[g]) % n
        if n > 1 and i == avoid:
            i = next(self._rr[g]) % n
        return i

    def submit(self, req: ExpertRequest) -> RayFuture:
        calls = {}
        for g, part in split_by_group(req.batches, self.expert_map).items():
            r = self.next_replica(g)
            ch, pending = self.channel(g, r), None
            if ch is not None:
                try:
                    pending = (ch, ch.send(req.layer, part))
                    self.channel_calls += 1
                except ChannelError:
                    pass  # the channel closed itself; this call goes through Ray
            if pending is None:
                pending = self.replicas[g][r].run.remote(req.layer, part)
                self.ray_calls += 1
            calls[g] = (pending, part, r)
        return RayFuture(self, req.layer, calls)

    def shutdown(self) -> None:
        for ch in self.channels.values():
            ch.close()
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
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False, logging_level=logging.WARNING)
    return True


def start_disaggregated(
    model_dir: str, dtype: str = "auto", engine_cfg: EngineConfig | None = None, experts_cfg: ExpertsConfig | None = None
) -> tuple[LLMEngine, Runtime]:
    """An engine in this process whose experts are Ray actors (started here, ready on return)."""
    started = ensure_ray()
    ckpt = Checkpoint(model_dir)
    ckpt.check_names()
    experts_cfg = experts_cfg or ExpertsConfig(num_cpus=0)
    experts = RayExperts(model_dir, ckpt.config.num_local_experts, dtype, experts_cfg)
    experts.wait_ready()
    dense = MixtralDense.from_checkpoint(ckpt, dtype)
    engine = LLMEngine(dense, experts, Tokenizer.for_model(model_dir), engine_cfg or EngineConfig(num_microbatches=2))
    return engine, Runtime(experts, started)
