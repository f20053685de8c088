"""The attention worker: one data-parallel replica of the dense path, its KV cache and the engine loop.

Requests reach it by a streaming handle call from the ingress; its experts are reached through
`ServeExperts` (cluster/serve/experts.py), over the data plane where a channel is known.

Outputs go back in one of two ways:

    generate / generate_choices(...)          the request's own stream carries its outputs
    generate_choices(..., sink, tag)          the request's stream carries this replica's key and ends
      + subscribe(sink, key), one per ingress   with the request; every step's outputs of all the
                                                sink's requests go as one message of `subscribe`

The ingress uses the second (cluster/serve/outputs.py, cluster/api/streams.py): one Ray streaming item
per step and ingress replica instead of one per step and request. The request's own stream stays open
while it runs, so Serve still routes, counts, autoscales and cancels by request, and a lost replica
still fails that stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time

import ray
import torch
from ray import serve

from cluster.api.metrics import AttentionStats
from cluster.build import ModelPlan, build_engine
from cluster.config import AppConfig
from cluster.runtime.experts import rss_bytes
from cluster.serve.experts import ServeExperts
from cluster.serve.outputs import SINK_TTL_S, Sink, Sinks, refused
from model.sampling import SamplingParams
from router.engine import EngineError, ErrorKind, FinishReason, Overloaded, RequestOutput, Resume

log = logging.getLogger(__name__)


@serve.deployment
class AttentionWorker:
    """Runs the engine loop in a thread of its own; `generate` streams one request's outputs.

    The engine loop owns the engine: requests, aborts and stats queries reach it through a
    thread-safe inbox that it drains between steps, so an async handler never waits on a step.
    Each step's outputs go back to the event loop in one hand-off and are fanned out to the streams.
    """

    def __init__(self, cfg: AppConfig, directory, *expert_handles):
        self.cfg = cfg
        torch.set_num_threads(cfg.attention.threads())  # Ray sets OMP_NUM_THREADS=1 for an actor without CPUs

        def experts(p: ModelPlan) -> ServeExperts:
            if len(p.groups) != len(expert_handles):
                raise ValueError(f"{len(expert_handles)} expert deployments for {len(p.groups)} expert groups")
            self.backend = ServeExperts(
                list(expert_handles), p.expert_map, cfg.experts, directory, cfg.attention.device
            )
            return self.backend

        self.engine = build_engine(cfg, experts)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        # engine thread's: request id -> (event loop, Queue or Sink, key): its outputs go there as (key, output)
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue | Sink, object]] = {}
        self.key = serve.get_replica_context().replica_id.unique_id  # what `subscribe` is pinned to
        self.sinks = Sinks()  # the event loop's: one per ingress replica that sends here (cluster/serve/outputs.py)
        self._reaper: asyncio.Task | None = None
        self.messages_sent = self.outputs_sent = 0  # by `subscribe`
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
                loop, target, keys = stream
                try:
                    for k, rid in enumerate(rids):
                        self.streams[rid] = (loop, target, keys[k])
                        first = prompts.index(prompts[k])  # the first choice of this prompt
                        fork = rids[first] if first < k else None
                        self.engine.add_request(prompts[k], params[k], rid, resumes[k], group, fork)
                except (EngineError, Overloaded) as e:
                    for rid in rids:
                        self.engine.abort(rid)
                        self.streams.pop(rid, None)
                    self.streams[rids[0]] = (loop, target, keys[0])
                    kind = ErrorKind.OVERLOADED if isinstance(e, Overloaded) else ErrorKind.INVALID
                    refused.append(
                        RequestOutput(rids[0], [], "", True, FinishReason.ERROR, error=str(e), error_kind=kind)
                    )
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

    def _stats(self) -> AttentionStats:
        import resource

        e, b = self.engine, self.backend
        return AttentionStats(
            running=e.num_running,
            waiting=e.num_waiting,
            kv_usage=e.blocks.usage,
            preemptions=e.scheduler.num_preemptions,
            kv_bytes=e.kv.nbytes(),
            dense_bytes=e.dense.nbytes(),
            engine_seconds={k: getattr(e.profile, k) for k in e.profile.PHASES},
            prefix_queries=e.blocks.stats.queries,
            prefix_hits=e.blocks.stats.hits,
            prefix_evictions=e.blocks.stats.evictions,
            prefix_cached_blocks=e.blocks.num_cached,
            routed_tokens=[[l, x, n] for (l, x), n in sorted(b.routed.items())],
            expert_in_flight_tokens=dict(b.in_flight),
            expert_calls=b.calls,
            expert_call_seconds=b.call_seconds,
            expert_retries=b.retries,
            expert_chunks=b.chunks_sent,
            expert_channel_calls=b.channel_calls,
            expert_ray_calls=b.ray_calls,
            expert_channels=sorted(b.channels),
            pid=os.getpid(),
            node_id=ray.get_runtime_context().get_node_id(),
            rss_bytes=rss_bytes(),
            max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            torch_threads=torch.get_num_threads(),
            output_messages=self.messages_sent,
            outputs_streamed=self.outputs_sent,
        )

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
        sink: str | None = None,
        tag: int = 0,
    ):
        """Stream the outputs of a request's choices, one message per step for all of them: a list of
        (choice index, RequestOutput), a choice's outputs merged when the stream is behind. The
        choices are admitted together (a refusal is one output with `error` set, for choice 0); a
        later choice of the same prompt shares the first one's prefill (`LLMEngine.add_request`'s
        fork). `group`: whose fair share they run in. A stream closed early (client gone) aborts
        every unfinished choice.

        With `sink` (an ingress replica's name) the outputs go to that sink as (tag, choice index,
        output) and this stream yields only this replica's key, then ends when every choice has
        ended (the ingress reads the outputs from `subscribe(sink, key)`)."""
        for c in {p.structured for p in params if p.structured is not None}:
            # compiled here, off the engine thread (the engine's add_request then finds it cached)
            try:
                await asyncio.to_thread(self.engine.grammars.check, c)
            except ValueError:  # a grammar that does not compile: the engine refuses the request with why
                pass
        base = f"{os.getpid()}-{next(self._ids)}"
        rids = [f"{base}.{k}" for k in range(len(prompts))]
        resumes = resumes or [None] * len(prompts)
        prompts = [list(p) for p in prompts]
        if sink is not None:
            s = self._sink(sink)
            ended = s.expect(tag, rids)
            keys = [(tag, k) for k in range(len(rids))]
            self._post("add", rids, prompts, params, resumes, group, (asyncio.get_running_loop(), s, keys))
            try:
                yield self.key
                await ended.wait()
            finally:
                left = s.forget(tag)
                if left:
                    self._post("abort", left)
            return
        q: asyncio.Queue = asyncio.Queue()
        self._post("add", rids, prompts, params, resumes, group, (asyncio.get_running_loop(), q, range(len(rids))))
        left = set(range(len(prompts)))
        try:
            while left:
                items = [await q.get()]
                while not q.empty():  # everything that is here: one message
                    items.append(q.get_nowait())
                for k, out in items:
                    if out.finished:
                        left.discard(k)
                    if refused(out):  # the whole request
                        left.clear()
                yield RequestOutput.by_choice(items)
        finally:
            if left:
                self._post("abort", [rids[k] for k in left])

    async def subscribe(self, sink: str, replica: str):
        """Every output of `sink`'s requests on this replica, one message per step: a list of (tag,
        choice index, RequestOutput) (`Sink.messages`). Pinned to the replica whose key is `replica` by
        the request router (cluster/serve/routing.py); any other replica refuses it, so the ingress
        treats that replica as gone."""
        if replica != self.key:
            raise LookupError(f"attention replica {replica} is gone (this is {self.key})")
        async for batch in self._sink(sink).messages():
            self.messages_sent += 1
            self.outputs_sent += len(batch)
            yield batch

    def _sink(self, name: str) -> Sink:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return self.sinks.get_or_add(name)

    async def _reap(self) -> None:
        """Drop the sinks of ingress replicas that are gone and abort their requests, so that outputs
        nobody will read never pile up."""
        while True:
            await asyncio.sleep(SINK_TTL_S / 4)
            rids = self.sinks.reap(time.monotonic())
            if rids:
                log.warning("ingress replica gone; aborting its requests", extra={"requests": len(rids)})
                self._post("abort", rids)

    async def stats(self) -> AttentionStats:
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
