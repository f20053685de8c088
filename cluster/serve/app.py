"""The Serve application: AttentionWorker replicas composed with one ExpertDeployment per expert group.

    AttentionWorker (data-parallel replicas; each: engine loop, KV cache, dense weights)
        |  ServeExperts: per layer and group, chunks over the data plane to the group's live replicas
        v  (learned from the ExpertDirectory deployment; Serve handles where no channel is known)
    ExpertDeployment "expert-group-{g}" (replicas spread over expert nodes; each: its experts, all layers)

`build_app(cfg)` only builds: it computes deployment options and binds; nothing starts or loads there.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.api.ingress import OpenAIIngress
from cluster.config import AppConfig, load_config, serve_mode_env
from cluster.serve.attention import AttentionWorker
from cluster.serve.directory import ExpertDirectory
from cluster.serve.experts import ExpertDeployment
from cluster.serve.routing import AttentionRouter
from model.config import MixtralConfig
from model.tiny import resolve_model
from router.experts import expert_groups


def serve_env(extra: dict[str, str] | None = None) -> dict:
    """A replica's runtime_env: the Serve mode mixserve runs in (config.serve_mode_env, as this Ray's
    processes have it) and `extra`."""
    return {"env_vars": {**serve_mode_env(), **(extra or {})}}


def build_app(cfg: AppConfig | dict) -> Application:
    """The whole application: OpenAI ingress -> AttentionWorker -> expert groups."""
    cfg = AppConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    s = cfg.server
    return OpenAIIngress.options(
        num_replicas=s.replicas,
        ray_actor_options={"num_cpus": s.num_cpus, "resources": dict(s.resources), "runtime_env": serve_env()},
        max_ongoing_requests=s.max_ongoing_requests,
    ).bind(cfg, build_attention(cfg))


# The directory's heartbeats (register every 2 s per expert replica, view every second) and the expert calls of the
# Ray fallback path are internal: no access-log line each on the console (errors are still logged).
QUIET = {"enable_access_log": False}
ADMISSION_HEADROOM = 64  # requests beyond the engine's admission that still reach it, to be refused


def build_attention(cfg: AppConfig | dict) -> Application:
    """AttentionWorker bound to its expert deployments; no I/O beyond reading config.json."""
    cfg = AppConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    num_experts = MixtralConfig.from_file(resolve_model(cfg.model)).num_local_experts
    x = cfg.experts
    expert_actor = {"num_cpus": x.num_cpus, "num_gpus": x.num_gpus, "resources": dict(x.resources)}
    expert_actor["runtime_env"] = serve_env({"OMP_NUM_THREADS": str(x.num_threads)} if x.num_threads else {})
    # The directory exists for the data plane; with `transport: ray` the handles carry every call.
    # It sits with the ingress (the head node where `server.resources` says so): soft state, one replica.
    directory = (
        ExpertDirectory.options(
            name="expert-directory",
            ray_actor_options={"num_cpus": 0, "resources": dict(cfg.server.resources), "runtime_env": serve_env()},
            logging_config=QUIET,
        ).bind()
        if x.transport == "channel"
        else None
    )
    # What a replica runs by: its scaling left out, so that a change of scaling restarts no replica.
    host_cfg = x.model_copy(update={"autoscaling": None, "replicas": 1})
    experts = []
    for g, group in enumerate(expert_groups(num_experts, x.experts_per_worker)):
        scale = (
            {"num_replicas": x.replicas}
            if x.autoscaling is None
            else {"num_replicas": "auto", "autoscaling_config": x.autoscaling.serve_config(g)}
        )
        experts.append(
            ExpertDeployment.options(
                name=f"expert-group-{g}",
                ray_actor_options=expert_actor,
                **scale,
                max_ongoing_requests=x.max_ongoing_requests,
                graceful_shutdown_timeout_s=x.graceful_shutdown_timeout_s,
                graceful_shutdown_wait_loop_s=0.5,
                logging_config=QUIET,
                # Replicas of one expert on different nodes, where there are several.
                max_replicas_per_node=1 if (x.replicas > 1 or x.autoscaling) and x.resources else None,
            ).bind(cfg.model, group, cfg.dtype, x.num_threads, host_cfg, g, directory)
        )
    a = cfg.attention
    attn_actor = {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus, "resources": dict(a.resources)}
    attn_actor["runtime_env"] = serve_env()
    scale = (
        {"num_replicas": a.replicas}
        if a.autoscaling is None
        else {"num_replicas": "auto", "autoscaling_config": a.autoscaling.serve_config()}
    )
    # Admission is the engine's (max_num_seqs running + max_waiting queued, then Overloaded = HTTP 503).
    # Serve's per-replica cap sits above it, so excess requests reach the engine and get a prompt 503
    # instead of waiting in Serve's queue; Serve's default (5) would cap continuous batching at 5 streams.
    admit = cfg.engine.max_num_seqs + cfg.engine.max_waiting + ADMISSION_HEADROOM
    # cluster/serve/routing.py: prefix affinity, and each ingress's output stream pinned to its replica
    scale["request_router_config"] = RequestRouterConfig(
        request_router_class=AttentionRouter,
        request_router_kwargs={
            "block_size": cfg.engine.block_size,
            "affinity_tokens": a.affinity_tokens,
            "imbalance": a.affinity_imbalance,
            "affinity": a.prefix_affinity and cfg.engine.enable_prefix_caching,
        },
    )
    return AttentionWorker.options(ray_actor_options=attn_actor, max_ongoing_requests=admit, **scale).bind(
        cfg, directory, *experts
    )


def resolve_config_path(path: str | None) -> str | None:
    """A relative config path is read from the working directory, else from the project root, so
    `config: configs/tiny.yaml` works from a checkout, `serve run`, and the KubeRay image alike."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    root = Path(__file__).resolve().parents[2]  # the project root (cluster/serve/app.py)
    return str(root / path) if (root / path).exists() else path


def app_builder(args: dict) -> Application:
    """Entry point for Ray's own tooling (`serve run configs/serve.yaml`, KubeRay's serveConfigV2).

    args: {"config": path to a mixserve YAML (optional), <any config key>: value, ...}; nested mappings
    and dotted keys both override the file. `model: null` is the embedded tiny checkpoint, which each
    process that needs it writes to its machine's cache folder (so it also works on a multi-node cluster).
    """
    args = dict(args or {})
    path = resolve_config_path(args.pop("config", None))

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("resources",):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    return build_app(load_config(path, flat(args)))
