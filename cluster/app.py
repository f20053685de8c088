"""The Serve application: AttentionWorker replicas composed with one ExpertDeployment per expert group.

    AttentionWorker (data-parallel replicas; each: engine loop, KV cache, dense weights)
        |  ServeExperts: per layer and group, chunks over the data plane to the group's live replicas
        v  (learned from the ExpertDirectory deployment; Serve handles where no channel is known)
    ExpertDeployment "expert-group-{g}" (replicas spread over expert nodes; each: its experts, all layers)

`build_app(cfg)` only builds: it computes deployment options and binds; nothing starts or loads there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import queue
import threading
from pathlib import Path

import ray
import torch
from ray import serve
from ray.serve import Application

from model.checkpoint import Checkpoint
from model.model import MixtralDense
from model.sampling import SamplingParams
from model.tiny import resolve_model
from model.tokenizer import Tokenizer
from router.engine import EngineError, LLMEngine, Overloaded, RequestOutput, Resume
from router.experts import expert_groups

from .config import AppConfig
from .deployments import ExpertDeployment, ExpertDirectory, ServeExperts
from .expert_runtime import rss_bytes

log = logging.getLogger(__name__)


@serve.deployment
class AttentionWorker:
    """Runs the engine loop in a thread of its own; `generate` streams one request's outputs.

    The engine loop owns the engine: requests, aborts and stats queries reach it through a
    thread-safe inbox that it drains between steps, so an async handler never waits on a step.
    Each step's outputs go back to the event loop in one hand-off and are fanned out to the streams.
    """

    def __init__(self, cfg: dict, num_experts: int, directory, *expert_handles):
        self.cfg = AppConfig.model_validate(cfg)
        c = self.cfg
        torch.set_num_threads(c.attention.threads())  # Ray sets OMP_NUM_THREADS=1 for an actor without CPUs
        c.model = resolve_model(c.model)
        ckpt = Checkpoint(c.model)
        ckpt.check_names()
        groups = expert_groups(num_experts, c.experts.experts_per_worker)
        emap = {e: g for g, es in enumerate(groups) for e in es}
        self.backend = ServeExperts(list(expert_handles), emap, c.experts, directory)
        self.engine = LLMEngine(
            MixtralDense.from_checkpoint(ckpt, c.dtype), self.backend, Tokenizer.for_model(c.model), c.engine
        )
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread's
        self._ids = itertools.count()
        self.thread = threading.Thread(target=self._run, daemon=True, name="engine-loop")
        self.thread.start()

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            while True:
                self._drain()
                if not self.engine.has_unfinished():
                    self.wake.wait()
                    self.wake.clear()
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - a bug, not a request's fault: end every stream, go on
                    log.exception("engine step raised; failing the running requests")
                    outs = self.engine.fail_all(f"internal engine error: {type(e).__name__}")
                self._deliver(outs)
        except BaseException:
            log.exception("engine loop died")  # check_health now fails and Serve replaces this replica
            raise

    def _drain(self) -> None:
        refused = []
        while True:
            try:
                op, *args = self.inbox.get_nowait()
            except queue.Empty:
                break
            if op == "add":  # a request's choices, all admitted or none
                rids, prompts, params, resumes, group, stream = args
                try:
                    for k, rid in enumerate(rids):
                        self.streams[rid] = (stream[0], stream[1], k)
                        first = prompts.index(prompts[k])  # the first choice of this prompt
                        fork = rids[first] if first < k else None
                        self.engine.add_request(prompts[k], params[k], rid, resumes[k], group, fork)
                except (EngineError, Overloaded) as e:
                    for rid in rids:
                        self.engine.abort(rid)
                        self.streams.pop(rid, None)
                    self.streams[rids[0]] = (stream[0], stream[1], 0)
                    kind = "overloaded" if isinstance(e, Overloaded) else "invalid"
                    refused.append(RequestOutput(rids[0], [], "", True, "error", error=str(e), error_kind=kind))
            elif op == "abort":
                for rid in args[0]:
                    self.engine.abort(rid)
                    self.streams.pop(rid, None)
            elif op == "stats":
                fut = args[0]
                try:
                    fut.set_result(self._stats())
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    fut.set_exception(e)
        self._deliver(refused)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """One hand-off to the event loop per step, whatever the number of streams."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for o in outs:
            s = self.streams.pop(o.req_id, None) if o.finished else self.streams.get(o.req_id)
            if s is not None:
                batches.setdefault(s[0], []).append((s[1], s[2], o))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_fan_out, batch)

    def _stats(self) -> dict:
        import resource

        e, b = self.engine, self.backend
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_bytes": rss_bytes(),
            "kv_bytes": e.kv.nbytes(),
            "expert_in_flight_tokens": dict(b.in_flight),
            "expert_chunks": b.chunks_sent,
            "running": e.num_running,
            "waiting": e.num_waiting,
            "kv_usage": e.blocks.usage,
            "expert_retries": b.retries,
            "dense_bytes": e.dense.nbytes(),
            "preemptions": e.scheduler.num_preemptions,
            "routed_tokens": [[l, x, n] for (l, x), n in sorted(b.routed.items())],
            "expert_calls": b.calls,
            "expert_call_seconds": b.call_seconds,
            "expert_channel_calls": b.channel_calls,
            "expert_ray_calls": b.ray_calls,
            "expert_channels": sorted(b.channels),
            "torch_threads": torch.get_num_threads(),
        }

    # ------------------------------------------------------------ the replica's event loop

    def _post(self, *op) -> None:
        self.inbox.put(op)
        self.wake.set()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, resume: Resume | None = None, group: str | None = None
    ):
        """Stream one sequence's `RequestOutput`s (`generate_choices` with one choice)."""
        async for batch in self.generate_choices([prompt_ids], [params], [resume], group):
            for _, out in batch:
                yield out

    async def generate_choices(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        resumes: list[Resume | None] | None = None,
        group: str | None = None,
    ):
        """Stream the outputs of a request's choices, one message per step for all of them: a list of
        (choice index, RequestOutput), a choice's outputs merged when the stream is behind. The
        choices are admitted together (a refusal is one output with `error` set, for choice 0); a
        later choice of the same prompt shares the first one's prefill (`LLMEngine.add_request`'s
        fork). `group`: whose fair share they run in. A stream closed early (client gone) aborts
        every unfinished choice."""
        q: asyncio.Queue = asyncio.Queue()
        base = f"{os.getpid()}-{next(self._ids)}"
        rids = [f"{base}.{k}" for k in range(len(prompts))]
        resumes = resumes or [None] * len(prompts)
        self._post("add", rids, [list(p) for p in prompts], params, resumes, group, (asyncio.get_running_loop(), q))
        left = set(range(len(prompts)))
        try:
            while left:
                got: dict[int, list[RequestOutput]] = {}
                k, out = await q.get()
                while True:  # everything that is here: one message
                    got.setdefault(k, []).append(out)
                    if out.finished:
                        left.discard(k)
                    if out.error is not None and out.error_kind != "failed":  # refused: the whole request
                        left.clear()
                    if q.empty():
                        break
                    k, out = q.get_nowait()
                yield [(k, RequestOutput.joined(outs)) for k, outs in sorted(got.items())]
        finally:
            if left:
                self._post("abort", [rids[k] for k in left])

    async def stats(self) -> dict:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._post("stats", fut)
        return await asyncio.wrap_future(fut)

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine loop has died is replaced."""
        if not self.thread.is_alive():
            raise RuntimeError("the engine loop is not running")


def _fan_out(batch: list) -> None:
    for q, k, out in batch:
        q.put_nowait((k, out))


def build_app(cfg: AppConfig | dict) -> Application:
    """The whole application: OpenAI ingress -> AttentionWorker -> expert groups."""
    from .openai_api import OpenAIIngress

    cfg = AppConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    s = cfg.server
    return OpenAIIngress.options(
        num_replicas=s.replicas,
        ray_actor_options={"num_cpus": s.num_cpus, "resources": dict(s.resources)},
        max_ongoing_requests=s.max_ongoing_requests,
    ).bind(cfg.model_dump(), build_attention(cfg))


# The directory's heartbeats (register / view, every second per replica) and the expert calls of the
# Ray fallback path are internal: no access-log line each on the console (errors are still logged).
QUIET = {"enable_access_log": False}
ADMISSION_HEADROOM = 64  # requests beyond the engine's admission that still reach it, to be refused


def build_attention(cfg: AppConfig | dict) -> Application:
    """AttentionWorker bound to its expert deployments; no I/O beyond reading config.json."""
    cfg = AppConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    from model.config import MixtralConfig

    num_experts = MixtralConfig.from_file(resolve_model(cfg.model)).num_local_experts
    x = cfg.experts
    expert_actor = {"num_cpus": x.num_cpus, "num_gpus": x.num_gpus, "resources": dict(x.resources)}
    if x.num_threads:
        expert_actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(x.num_threads)}}
    # The directory exists for the data plane; with `transport: ray` the handles carry every call.
    # It sits with the ingress (the head node where `server.resources` says so): soft state, one replica.
    directory = (
        ExpertDirectory.options(
            name="expert-directory",
            ray_actor_options={"num_cpus": 0, "resources": dict(cfg.server.resources)},
            logging_config=QUIET,
        ).bind()
        if x.transport == "channel"
        else None
    )
    host_cfg = x.model_dump(exclude={"autoscaling", "replicas"})  # scaling changes restart no replica
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
    scale = (
        {"num_replicas": a.replicas}
        if a.autoscaling is None
        else {"num_replicas": "auto", "autoscaling_config": a.autoscaling.serve_config()}
    )
    # Admission is the engine's (max_num_seqs running + max_waiting queued, then Overloaded = HTTP 503).
    # Serve's per-replica cap sits above it, so excess requests reach the engine and get a prompt 503
    # instead of waiting in Serve's queue; Serve's default (5) would cap continuous batching at 5 streams.
    admit = cfg.engine.max_num_seqs + cfg.engine.max_waiting + ADMISSION_HEADROOM
    return AttentionWorker.options(ray_actor_options=attn_actor, max_ongoing_requests=admit, **scale).bind(
        cfg.model_dump(), num_experts, directory, *experts
    )


def replica_counts(app_name: str) -> dict[str, int]:
    """RUNNING replicas per deployment of an application, as the Serve controller sees them."""
    app = serve.status().applications.get(app_name)
    return {
        name: sum(n for st, n in d.replica_states.items() if str(st).endswith("RUNNING"))
        for name, d in (app.deployments.items() if app else [])
    }


def resolve_config_path(path: str | None) -> str | None:
    """A relative config path is read from the working directory, else from the project root, so
    `config: configs/tiny.yaml` works from a checkout, `serve run`, and the KubeRay image alike."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    root = Path(__file__).resolve().parent.parent
    return str(root / path) if (root / path).exists() else path


def app_builder(args: dict) -> Application:
    """Entry point for Ray's own tooling (`serve run configs/serve.yaml`, KubeRay's serveConfigV2).

    args: {"config": path to a mixserve YAML (optional), <any config key>: value, ...}; nested mappings
    and dotted keys both override the file. `model: null` is the embedded tiny checkpoint, which each
    process that needs it writes to its machine's cache folder (so it also works on a multi-node cluster).
    """
    from .config import load_config

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
