"""The ingress's routes: OpenAI-compatible HTTP (FastAPI inside Ray Serve) and gRPC.

    client --HTTP/gRPC--> OpenAIIngress: auth, size limit, parse + schema (cluster/api/protocol.py)
                          -> OpenAIServing (cluster/api/serving.py): prompts x n, sampling params, responses
                          --streaming handle--> AttentionWorker.generate --> outputs --> JSON or SSE

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 bad
key, 404 unknown model or route, 413 body too large, 503 overloaded (with Retry-After). A bad request
is answered here and never reaches a worker. gRPC calls go through the same checks and get the
matching status codes.
"""

import asyncio
import ipaddress
import logging
import os
import time

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.grpc_util import RayServegRPCContext
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.api.metrics import AttentionStats, Metrics
from cluster.api.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Detokenize,
    ModelLimits,
    RequestBudget,
    TokenizeChat,
    TokenizeCompletion,
    key_matches,
    parse_json,
    read_body,
    unauthorized,
    validate,
)
from cluster.api.serving import OFF_LOOP_CHARS, OpenAIServing, StallGuard
from cluster.api.streams import LOST, OutputStreams
from cluster.config import AppConfig
from cluster.proto import mixserve_pb2 as pb
from model.config import MixtralConfig
from model.sampling import SamplingParams
from model.tiny import resolve_model
from model.tokenizer import Tokenizer
from router.engine import ErrorKind, RequestOutput, Resume
from router.experts import expert_groups

log = logging.getLogger(__name__)
# A streaming call fails with these when its attention replica's process is gone.
ATTENTION_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
# HTTP status -> gRPC status for the same refusal.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}

# FastAPI's own /docs, /redoc and /openapi.json are off: they would answer without the API key. The
# ingress serves /docs and /openapi.json itself when `server.enable_docs` is set, behind the key.
STATS_TTL_S = 60.0  # an attention replica not heard from for this long is left out of /metrics
COUNTS_EVERY_S = 5.0  # /metrics asks the Serve controller for replica counts at most this often

api = FastAPI(
    title="mixserve", description="OpenAI-compatible API of mixserve", docs_url=None, redoc_url=None, openapi_url=None
)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return error_response(e)


@api.exception_handler(RequestValidationError)
async def _validation(request: Request, e: RequestValidationError):
    return error_response(APIError(400, f"invalid request: {e.errors()[:1]}"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(APIError(e.status_code, str(e.detail), kind))


class AttentionLost(Exception):
    """The attention replica running a request is gone (or its outputs no longer reach this ingress)."""


def output_error(out: RequestOutput) -> APIError:
    """The refusal or failure an attention replica reported for one request, as an API error."""
    if out.error_kind == ErrorKind.OVERLOADED:
        return APIError(
            503,
            "the server is overloaded; retry later",
            "server_error",
            code="overloaded",
            headers={"Retry-After": "1"},
        )
    if out.error_kind == ErrorKind.INVALID:
        return APIError(400, out.error or "invalid request")
    return APIError(500, f"the request failed: {out.error}", "server_error", code="request_failed")


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _peer_host(peer: str) -> str:
    """gRPC's peer ('ipv4:127.0.0.1:5555', 'ipv6:%5B::1%5D:5555', '127.0.0.1:5555') -> its host."""
    p = peer.replace("%5B", "[").replace("%5D", "]")
    if p.startswith(("ipv4:", "ipv6:")):
        p = p[5:]
    if p.startswith("["):
        return p[1 : p.find("]")]
    return p.rsplit(":", 1)[0]


def _stop_reason(out: RequestOutput) -> dict:
    """vLLM's stop_reason in the proto: the stop string, or the stop token id."""
    if isinstance(out.stop_reason, str):
        return {"stop_string": out.stop_reason}
    if isinstance(out.stop_reason, int):
        return {"stop_token_id": out.stop_reason}
    return {}


def replica_counts(app_name: str) -> dict[str, int]:
    """RUNNING replicas per deployment of an application, as the Serve controller sees them."""
    app = serve.status().applications.get(app_name)
    return {
        name: sum(n for st, n in d.replica_states.items() if str(st).endswith("RUNNING"))
        for name, d in (app.deployments.items() if app else [])
    }


# Everything the ingress's methods use is defined above it: Serve serialises the class by value
# when it is decorated, with the module globals that exist at that point.
# ---------------------------------------------------------------- the ingress


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, cfg: AppConfig, attention):
        self.cfg = cfg.model_copy(update={"model": str(resolve_model(cfg.model))})
        self.attention = attention
        self.streams = OutputStreams(attention)
        self.tokenizer = Tokenizer.for_model(self.cfg.model)
        mc = self.mc = MixtralConfig.from_file(self.cfg.model)
        s = self.cfg.server
        self.limits = ModelLimits(
            s.served_model_name or os.path.basename(os.path.normpath(self.cfg.model)),
            mc.vocab_size,
            self.cfg.engine.context_len(mc.max_position_embeddings),
            s.max_tokens_default,
            RequestBudget.of(s, mc.num_hidden_layers, mc.num_experts_per_tok),
        )
        self.serving = OpenAIServing(self.tokenizer, self.limits, self._outputs)
        self.api_key = s.api_key or os.environ.get("MIXSERVE_API_KEY")
        # Each ingress replica's own gRPC server (Serve's direct ingress) listens on every interface
        # (Ray has no option for its host); with a loopback server.host the ingress answers gRPC calls
        # from this host only.
        self.loopback_only = is_loopback(s.host)
        self.created = int(time.time())
        self.metrics = Metrics(self.limits.name, self.limits.max_model_len)
        x = self.cfg.experts
        groups = expert_groups(mc.num_local_experts, x.experts_per_worker)
        bounds = [x.autoscaling.bounds(g) if x.autoscaling else (x.replicas, x.replicas) for g in range(len(groups))]
        self.metrics.set_bounds(groups, bounds)
        self.app_name = serve.get_replica_context().app_name
        self._metrics_lock = asyncio.Lock()
        self._metrics_at = float("-inf")
        self._counts: dict[str, int] = {}
        self._counts_at = float("-inf")
        self._reports: dict[tuple, tuple[float, dict]] = {}  # (node, pid) -> (when, an attention replica's stats)

    # ------------------------------------------------------------ shared checks

    def _authorize(self, request: Request) -> None:
        if not key_matches(request.headers.get("authorization"), self.api_key):
            raise unauthorized()

    async def _json(self, request: Request, schema=None):
        """An authorised request's body as a JSON object (validated against `schema` when given),
        bounded as it is read. A large body is parsed off the event loop: the decoder calls back into
        Python per number (~0.5 s for 1 MiB of them), and the loop meanwhile relays other streams."""
        self._authorize(request)
        raw = await read_body(request, self.cfg.server.max_request_bytes)

        def parse():
            data = parse_json(raw)
            return data if schema is None else validate(schema, data)

        return parse() if len(raw) < OFF_LOOP_CHARS else await asyncio.to_thread(parse)

    async def _body(self, request: Request, schema):
        return await self._json(request, schema)

    async def _outputs(self, prompts: list[list[int]], params: list[SamplingParams], group: str | None = None):
        """The outputs of a request's choices (one per prompt in `prompts`), as batches of (choice,
        RequestOutput) with the first batch already received: a refusal (overload, bad input) becomes
        an HTTP status before any byte of a stream is sent."""
        t0 = time.perf_counter()
        outs = self._resilient(prompts, params, group)
        first = await outs.__anext__()
        refused = next((o for _, o in first if o.error is not None), None)
        if refused is not None:
            await outs.aclose()
            raise output_error(refused)
        m = self.metrics
        m_prompt = sum(len(p) for p in prompts)
        m.admitted(m_prompt)
        if any(o.new_token_ids for _, o in first):
            m.first_token(time.perf_counter() - t0)

        async def rest():
            left, last = set(range(len(prompts))), time.perf_counter()
            reasons: dict[int, str] = {}
            generated = 0
            try:
                batch = first
                while True:
                    now = time.perf_counter()
                    for k, out in batch:
                        n = len(out.new_token_ids)
                        generated += n
                        m.tokens(n, (now - last) / n if batch is not first and n else None)
                        if out.finished:
                            left.discard(k)
                            reasons[k] = str(out.finish_reason)
                        if out.error is not None:
                            raise output_error(out)
                    last = now
                    yield batch
                    if not left:
                        m.finished(list(reasons.values()), time.perf_counter() - t0, m_prompt, generated)
                        return
                    batch = await outs.__anext__()
            finally:
                if left:  # the client went away: free the sequences
                    await outs.aclose()

        return rest()

    async def _resilient(self, prompts: list[list[int]], params: list[SamplingParams], group: str | None):
        """A request's outputs from an attention replica, all its choices in one call, read from that
        replica's output stream to this ingress (cluster/api/streams.py). If that replica dies
        mid-request, the unfinished choices are re-submitted to another replica with what they had
        produced (`Resume`: the tokens, re-prefilled, and the characters the client has), which goes
        on where they were: text that was held back is delivered and a stop string across the
        failover point is found. Greedy decoding gives exactly the stream of an undisturbed run. When
        the re-submit budget is spent the stream fails (an error event, then [DONE])."""
        done: list[list[int]] = [[] for _ in prompts]
        chars = [0] * len(prompts)
        finished = [False] * len(prompts)
        resubmits = 0
        streams = self.streams
        while True:
            todo = [k for k in range(len(prompts)) if not finished[k]]
            resumes = [Resume(done[k], chars[k]) if done[k] else None for k in todo]
            tag, q = streams.open()
            resp = self.attention.options(stream=True).generate_choices.remote(
                [prompts[k] for k in todo], [params[k] for k in todo], resumes, group, streams.sink, tag
            )
            streams.follow(resp, tag)
            try:
                while True:
                    items = [await q.get()]
                    while not q.empty():  # everything that is here: one batch
                        items.append(q.get_nowait())
                    # (choice, output) pairs, then possibly a marker: LOST, or the request's call's error
                    cut = next((i for i, x in enumerate(items) if isinstance(x, (str, BaseException))), len(items))
                    if cut:
                        mapped = []
                        for j, out in RequestOutput.by_choice(items[:cut]):
                            k = todo[j]
                            done[k] += out.new_token_ids
                            chars[k] += len(out.text)
                            finished[k] = finished[k] or out.finished
                            mapped.append((k, out))
                        yield mapped
                        if all(finished):
                            return
                    if cut < len(items):
                        marker = items[cut]
                        if marker == LOST or isinstance(marker, ATTENTION_LOST):
                            raise AttentionLost(str(marker))
                        raise marker
            except AttentionLost as e:
                resp.cancel()
                resubmits += 1
                if resubmits > self.cfg.attention.max_resubmits:
                    raise APIError(
                        503,
                        f"the request was lost with {resubmits} attention replicas",
                        "server_error",
                        code="attention_unavailable",
                    ) from None
                self.metrics.resubmits.inc()
                log.warning(
                    "attention replica lost; re-submitting",
                    extra={"tokens_so_far": sum(map(len, done)), "attempt": resubmits, "error": str(e)[:200]},
                )
            except GeneratorExit:  # closed by its consumer: after the last output, or the client went away
                if not all(finished):  # free the sequences; a finished request's stream ends by itself
                    resp.cancel()
                raise
            except BaseException:  # a real error: free the sequences
                resp.cancel()
                raise
            finally:
                streams.close(tag)

    # ------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics_text(self):
        """A snapshot at most `server.metrics_refresh_s` old. Concurrent scrapes share one refresh,
        nothing blocks the event loop, and the controller is asked at most every `COUNTS_EVERY_S`."""
        async with self._metrics_lock:
            if time.monotonic() - self._metrics_at >= self.cfg.server.metrics_refresh_s:
                await self._refresh_metrics()
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def _refresh_metrics(self) -> None:
        """Each attention replica's stats (asked as many times at once as there are replicas, so that
        the handle's routing reaches each; a replica's last report counts for `STATS_TTL_S`), summed,
        and the replica counts from the controller (in a thread: `serve.status()` blocks)."""
        now = time.monotonic()
        try:
            if now - self._counts_at >= COUNTS_EVERY_S:
                self._counts = await asyncio.to_thread(replica_counts, self.app_name)
                self._counts_at = now
        except Exception as e:  # noqa: BLE001 - the replica counts stay as they were; a scrape never fails for it
            log.debug("replica counts unavailable", extra={"error": f"{type(e).__name__}: {e}"[:300]})
        n = max(1, sum(c for d, c in self._counts.items() if d.startswith("AttentionWorker")))
        got = await asyncio.gather(*(self.attention.stats.remote() for _ in range(n)), return_exceptions=True)
        now = time.monotonic()
        for st in got:
            if isinstance(st, AttentionStats):
                self._reports[(st.node_id, st.pid)] = (now, st)
        for key in [k for k, (t, _) in self._reports.items() if now - t > STATS_TTL_S]:
            del self._reports[key]
        experts = {d.removeprefix("expert-group-"): c for d, c in self._counts.items() if d.startswith("expert-group-")}
        if self._reports:
            self.metrics.update_from({key: st for key, (_, st) in self._reports.items()}, experts)
        self._metrics_at = now

    @api.get("/openapi.json")
    async def openapi(self, request: Request):
        self._docs_allowed(request)
        return api.openapi()

    @api.get("/docs")
    async def docs(self, request: Request):
        from fastapi.openapi.docs import get_swagger_ui_html

        self._docs_allowed(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="mixserve")

    def _docs_allowed(self, request: Request) -> None:
        if not self.cfg.server.enable_docs:
            raise StarletteHTTPException(404, "Not Found")
        self._authorize(request)

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.limits.name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "mixserve",
                    # vLLM's card: `root` is the checkpoint (vLLM's benchmark loads its tokenizer from it)
                    "root": self.cfg.model,
                    "parent": None,
                    "max_model_len": self.limits.max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{self.created}",
                            "object": "model_permission",
                            "created": self.created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                    "num_experts": self.mc.num_local_experts,  # extensions, for routed-expert tools
                    "num_experts_per_tok": self.mc.num_experts_per_tok,
                }
            ],
        }

    async def _counted(self, route: str, fn, request: Request):
        """Run a route, counting its outcome; an APIError becomes its OpenAI-shaped response. A body
        is written by `json.dumps` alone (FastAPI's jsonable_encoder walks every element in Python:
        ~1 s for a 1 MiB prompt's token ids)."""
        try:
            resp = await fn(request)
            if isinstance(resp, dict):
                resp = JSONResponse(resp)
            status = 200
        except APIError as e:
            resp, status = error_response(e), e.status
        self.metrics.requests.labels(route, str(status)).inc()
        return resp

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._counted(
            "/v1/completions", self._generate(CompletionRequest, self.serving.completions), request
        )

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._counted("/v1/chat/completions", self._generate(ChatRequest, self.serving.chat), request)

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        async def run(request):
            data = await self._json(request)  # a prompt or chat messages
            return await self.serving.tokenize(
                validate(TokenizeChat if "messages" in data else TokenizeCompletion, data)
            )

        return await self._counted("/tokenize", run, request)

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        async def run(request):
            return await self.serving.detokenize(await self._body(request, Detokenize))

        return await self._counted("/detokenize", run, request)

    def _generate(self, schema, serve_fn):
        async def run(request: Request):
            result = await serve_fn(await self._body(request, schema))
            if isinstance(result, dict):
                return result
            guarded = StallGuard(result, self.cfg.server.stream_stall_timeout_s, self.metrics.stream_stalls.inc)
            return StreamingResponse(guarded, media_type="text/event-stream")

        return run

    # ------------------------------------------------------------ gRPC (mixserve.v1.MixServe)

    async def _grpc_request(self, request, grpc_context: RayServegRPCContext):
        """proto GenerateRequest -> (prompt ids, SamplingParams) through the same checks as HTTP:
        the peer and API key first, then size, then the completion schema."""
        if self.loopback_only and not is_loopback(_peer_host(grpc_context.peer())):
            raise APIError(
                403,
                "this server takes gRPC calls from this host only (server.host is a loopback address)",
                "permission_error",
            )
        metadata = dict(grpc_context.invocation_metadata())
        if not key_matches(metadata.get("authorization"), self.api_key):
            raise unauthorized()
        size = request.ByteSize()
        if size > self.cfg.server.max_request_bytes:
            raise APIError(413, f"request is {size} bytes; the limit is {self.cfg.server.max_request_bytes}")
        body = {
            "model": self.limits.name,
            "top_p": request.top_p or 1.0,
            "top_k": request.top_k,
            "stop": list(request.stop),
            "ignore_eos": request.ignore_eos,
            "prompt": list(request.prompt_token_ids) or request.prompt,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "min_p": request.min_p,
            "min_tokens": request.min_tokens,
            "stop_token_ids": list(request.stop_token_ids),
            "logit_bias": dict(request.logit_bias),
            "include_stop_str_in_output": request.include_stop_str_in_output,
            "skip_reading_prefix_cache": request.skip_reading_prefix_cache,
        }
        if request.max_tokens:  # 0 = the server default
            body["max_tokens"] = request.max_tokens
        for name in ("temperature", "seed", "repetition_penalty", "skip_special_tokens", "cache_salt"):  # unset: HTTP's
            if request.HasField(name):
                body[name] = getattr(request, name)
        req = validate(CompletionRequest, body)
        prompt = (await self.serving.prompts_of(req))[0]
        sp = self.limits.sampling_params(req, len(prompt.ids), req.max_tokens, None, "prompt")
        self.limits.budget.check(req, [len(prompt.ids)], [sp])
        return [prompt.ids], [sp]

    async def _grpc_outputs(self, request, grpc_context):
        """The request's outputs, or None after setting the gRPC status of its refusal."""
        try:
            return await self._outputs(*(await self._grpc_request(request, grpc_context)))
        except APIError as e:
            grpc_context.set_code(GRPC_CODES.get(e.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(e.message)
            return None

    async def Generate(self, request, grpc_context: RayServegRPCContext):
        outs = await self._grpc_outputs(request, grpc_context)
        if outs is None:
            return pb.GenerateResponse()
        try:
            text, toks, last, cached = "", [], None, 0
            async for batch in outs:
                for _, out in batch:
                    text += out.text
                    toks += out.new_token_ids
                    last = out
                    cached = out.cached_tokens if out.cached_tokens is not None else cached
        except APIError as e:
            grpc_context.set_code(GRPC_CODES.get(e.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(e.message)
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            text=text,
            token_ids=toks,
            finished=True,
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=cached,
            **_stop_reason(last),
        )

    async def GenerateStream(self, request, grpc_context: RayServegRPCContext):
        outs = await self._grpc_outputs(request, grpc_context)
        if outs is None:
            return
        # Direct ingress pulls the next message once gRPC has taken the last one, which waits while the
        # client's flow-control window is shut: a client that reads nothing is found as for SSE.
        guarded = StallGuard(
            self._grpc_messages(outs, grpc_context),
            self.cfg.server.stream_stall_timeout_s,
            self.metrics.stream_stalls.inc,
        )
        async for message in guarded:
            yield message
        if guarded.stalled:  # seen only by a client that reads again later
            grpc_context.set_code(grpc.StatusCode.ABORTED)
            grpc_context.set_details(
                f"the stream was aborted: its client read nothing for {self.cfg.server.stream_stall_timeout_s} s"
            )

    async def _grpc_messages(self, outs, grpc_context: RayServegRPCContext):
        try:
            cached = 0
            async for batch in outs:
                for _, out in batch:
                    cached = out.cached_tokens if out.cached_tokens is not None else cached
                    yield pb.GenerateResponse(
                        text=out.text,
                        token_ids=out.new_token_ids,
                        finished=out.finished,
                        finish_reason=out.finish_reason or "",
                        prompt_tokens=out.prompt_tokens,
                        completion_tokens=out.completion_tokens,
                        cached_tokens=cached,
                        **_stop_reason(out),
                    )
        except APIError as e:
            grpc_context.set_code(GRPC_CODES.get(e.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(e.message)
        finally:
            await outs.aclose()  # closed early (the guard, a cancelled call): the unfinished choices are aborted
