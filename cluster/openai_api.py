"""OpenAI-compatible HTTP ingress (FastAPI inside Ray Serve).

    client --HTTP--> OpenAIIngress: auth, size limit, parse + validate, tokenise / chat format
                     --streaming handle--> AttentionWorker.generate --> outputs --> JSON or SSE

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 bad
key, 404 unknown model or route, 413 body too large, 503 overloaded (with Retry-After). A bad request
is answered here and never reaches a worker (parsing and schemas: cluster/protocol.py). gRPC calls go
through the same checks and get the matching status codes.
"""

import ipaddress
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
import grpc
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.grpc_util import RayServegRPCContext
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.config import MixtralConfig
from model.sampling import SamplingParams
from model.tiny import resolve_model
from model.tokenizer import ChatFormatError, Tokenizer, TokenizeError
from router.engine import RequestOutput, Resume

from .config import AppConfig
from .metrics import Metrics
from .proto import mixserve_pb2 as pb
from .protocol import (APIError, ChatRequest, CompletionRequest, key_matches, parse_json, read_body, unauthorized,
                       validate)

log = logging.getLogger(__name__)
# A streaming call fails with these when its attention replica's process is gone.
ATTENTION_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
# HTTP status -> gRPC status for the same refusal.
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
              413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}

api = FastAPI(title="mixserve", description="OpenAI-compatible API of mixserve")


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


def output_error(out: RequestOutput) -> APIError:
    """The refusal or failure an attention replica reported for one request, as an API error."""
    if out.error_kind == "overloaded":
        return APIError(503, "the server is overloaded; retry later", "server_error", code="overloaded",
                        headers={"Retry-After": "1"})
    if out.error_kind == "invalid":
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


# ---------------------------------------------------------------- the ingress


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, cfg: dict, attention):
        self.cfg = AppConfig.model_validate(cfg)
        self.cfg.model = resolve_model(self.cfg.model)
        self.attention = attention
        self.tokenizer = Tokenizer.for_model(self.cfg.model)
        mc = MixtralConfig.from_file(self.cfg.model)
        self.vocab = mc.vocab_size
        self.max_model_len = min(self.cfg.engine.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        s = self.cfg.server
        self.model_name = s.served_model_name or os.path.basename(os.path.normpath(self.cfg.model))
        self.api_key = s.api_key or os.environ.get("MIXSERVE_API_KEY")
        # Serve's gRPC proxy listens on every interface (Ray has no option for its host); with a
        # loopback server.host the ingress answers gRPC calls from this host only.
        self.loopback_only = is_loopback(s.host)
        self.created = int(time.time())
        self.metrics = Metrics()
        self.app_name = serve.get_replica_context().app_name


    # ------------------------------------------------------------ shared checks

    async def _body(self, request: Request, schema):
        if not key_matches(request.headers.get("authorization"), self.api_key):
            raise unauthorized()
        req = validate(schema, parse_json(await read_body(request, self.cfg.server.max_request_bytes)))
        self._check_model(req)
        return req

    def _check_model(self, req) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        for p in ("presence_penalty", "frequency_penalty"):
            if getattr(req, p):
                raise APIError(400, f"{p} is not supported (must be 0)", param=p)
        if req.repetition_penalty != 1.0:
            raise APIError(400, "repetition_penalty is not supported (must be 1)", param="repetition_penalty")

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except TokenizeError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._encode(prompt, "prompt")
        if not prompt or min(prompt) < 0 or max(prompt) >= self.vocab:
            raise APIError(400, f"prompt token ids must be non-empty and in [0, {self.vocab})", param="prompt")
        return list(prompt)

    def _params(self, req, max_tokens: int | None, prompt_len: int, logprobs: int | None) -> SamplingParams:
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len} tokens",
                           param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = min(self.cfg.server.max_tokens_default, room)
        elif max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                                f"context of {self.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
        if any(t < 0 or t >= self.vocab for t in req.stop_token_ids):
            raise APIError(400, f"stop_token_ids must be in [0, {self.vocab})", param="stop_token_ids")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  seed=req.seed, stop=stop, stop_token_ids=req.stop_token_ids,
                                  ignore_eos=req.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _outputs(self, prompt_ids: list[int], sp: SamplingParams):
        """The request's outputs, with the first one already received: a refusal (overload, bad
        input) becomes an HTTP status before any byte of a stream is sent."""
        t0 = time.perf_counter()
        outs = self._resilient(prompt_ids, sp)
        first = await outs.__anext__()
        if first.error is not None:
            await outs.aclose()
            raise output_error(first)
        m = self.metrics
        m.prompt_tokens.inc(len(prompt_ids))
        if first.new_token_ids:
            m.ttft.observe(time.perf_counter() - t0)

        async def rest():
            finished, last = False, time.perf_counter()
            try:
                out = first
                while True:
                    finished = out.finished
                    n = len(out.new_token_ids)
                    m.generated_tokens.inc(n)
                    if out is not first and n:
                        now = time.perf_counter()
                        m.itl.observe((now - last) / n)
                        last = now
                    if out.error is not None:
                        raise output_error(out)
                    yield out
                    if finished:
                        return
                    out = await outs.__anext__()
            finally:
                if not finished:  # the client went away: free the sequence
                    await outs.aclose()

        return rest()

    async def _resilient(self, prompt_ids: list[int], sp: SamplingParams):
        """One request's outputs from an attention replica. If that replica dies mid-request, the
        request is re-submitted to another replica with what it had produced (`Resume`: the tokens,
        re-prefilled, and the characters the client has), which goes on where it was: text that
        was held back is delivered and a stop string across the failover point is found. Greedy
        decoding gives exactly the stream of an undisturbed run. When the re-submit budget is spent
        the stream fails (an error event, then [DONE])."""
        done: list[int] = []
        chars = 0
        resubmits = 0
        while True:
            resume = Resume(done, chars) if done else None
            resp = self.attention.options(stream=True).generate.remote(prompt_ids, sp, resume)
            try:
                async for out in resp:
                    done += out.new_token_ids
                    chars += len(out.text)
                    yield out
                    if out.finished:
                        return
                raise APIError(500, "the attention replica ended the stream early", "server_error")
            except ATTENTION_LOST as e:
                resp.cancel()
                resubmits += 1
                if resubmits > self.cfg.attention.max_resubmits:
                    raise APIError(503, f"the request was lost with {resubmits} attention replicas",
                                   "server_error", code="attention_unavailable") from None
                self.metrics.resubmits.inc()
                log.warning("attention replica lost; re-submitting",
                            extra={"tokens_so_far": len(done), "attempt": resubmits, "error": type(e).__name__})
            except BaseException:  # the client went away (generator closed) or a real error: free the sequence
                resp.cancel()
                raise

    # ------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics_text(self):
        stats = await self.attention.stats.remote()
        replicas = {}
        try:  # replica counts as Serve sees them; absent where the controller cannot be asked
            from .app import replica_counts

            replicas = {name.removeprefix("expert-group-"): n for name, n in replica_counts(self.app_name).items()
                        if name.startswith("expert-group-")}
        except Exception:  # noqa: BLE001
            pass
        self.metrics.update_from(stats, replicas)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request):
        if not key_matches(request.headers.get("authorization"), self.api_key):
            raise unauthorized()
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "mixserve", "max_model_len": self.max_model_len}]}

    async def _counted(self, route: str, fn, request: Request):
        """Run a route, counting its outcome; an APIError becomes its OpenAI-shaped response."""
        try:
            resp = await fn(request)
            status = 200
        except APIError as e:
            resp, status = error_response(e), e.status
        self.metrics.requests.labels(route, str(status)).inc()
        return resp

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._counted("/v1/completions", self._completions, request)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._counted("/v1/chat/completions", self._chat, request)

    async def _completions(self, request: Request):
        req = await self._body(request, CompletionRequest)
        ids = self._prompt_ids(req)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        sp = self._params(req, req.max_tokens, len(ids), req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._sse(self._stream_completion(rid, req, await self._outputs(ids, sp)))
        text, lps, last = await self._collect(await self._outputs(ids, sp))
        choice = {"index": 0, "text": text, "finish_reason": last.finish_reason,
                  "logprobs": self._completion_logprobs(lps) if req.logprobs is not None else None}
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": [choice], "usage": self._usage(last)}

    async def _chat(self, request: Request):
        req = await self._body(request, ChatRequest)
        try:
            ids = self.tokenizer.encode_chat([m.model_dump() for m in req.messages])
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        sp = self._params(req, req.max_completion_tokens or req.max_tokens, len(ids), top)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._sse(self._stream_chat(rid, req, await self._outputs(ids, sp)))
        text, lps, last = await self._collect(await self._outputs(ids, sp))
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason,
                  "logprobs": self._chat_logprobs(lps) if req.logprobs else None}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": [choice], "usage": self._usage(last)}

    @staticmethod
    async def _collect(outs) -> tuple[str, list, RequestOutput]:
        """A whole non-streamed answer: its text, its logprobs, and the final output (usage, reason)."""
        text, lps, last = "", [], None
        async for out in outs:
            text += out.text
            lps += out.logprobs
            last = out
        return text, lps, last

    # ------------------------------------------------------------ streaming

    def _sse(self, gen):
        return StreamingResponse(gen, media_type="text/event-stream")

    async def _events(self, head: dict, req, outs, choice_of, first: dict | None = None):
        """SSE framing shared by both routes: one chunk per output that `choice_of` turns into a choice
        (None = nothing to send), usage on the last when asked, an error event, then [DONE]."""
        if first is not None:
            yield f"data: {json.dumps(head | {'choices': [first]})}\n\n"
        try:
            async for out in outs:
                choice = choice_of(out)
                if choice is None:
                    continue
                chunk = head | {"choices": [choice]}
                if out.finished and req.stream_options and req.stream_options.include_usage:
                    chunk["usage"] = self._usage(out)
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:  # after the first byte a status can no longer change: an error event
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:  # noqa: BLE001 - whatever ended the stream, the client gets an error and [DONE]
            log.exception("stream failed")
            err = APIError(500, f"the stream failed: {type(e).__name__}", "server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    def _stream_completion(self, rid, req, outs):
        def choice_of(out):
            if not (out.text or out.finished):
                return None
            return {"index": 0, "text": out.text, "finish_reason": out.finish_reason if out.finished else None,
                    "logprobs": self._completion_logprobs(out.logprobs) if req.logprobs is not None else None}

        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        return self._events(head, req, outs, choice_of)

    def _stream_chat(self, rid, req, outs):
        def choice_of(out):
            if not (out.text or out.finished or (req.logprobs and out.logprobs)):
                return None
            return {"index": 0, "delta": {"content": out.text} if out.text else {},
                    "finish_reason": out.finish_reason if out.finished else None,
                    "logprobs": self._chat_logprobs(out.logprobs) if req.logprobs else None}

        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_name}
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return self._events(head, req, outs, choice_of, first)

    # ------------------------------------------------------------ gRPC (mixserve.v1.MixServe)

    def _grpc_request(self, request, grpc_context: RayServegRPCContext):
        """proto GenerateRequest -> (prompt ids, SamplingParams) through the same checks as HTTP:
        the peer and API key first, then size, then the completion schema."""
        if self.loopback_only and not is_loopback(_peer_host(grpc_context.peer())):
            raise APIError(403, "this server takes gRPC calls from this host only (server.host is a loopback address)",
                           "permission_error")
        metadata = dict(grpc_context.invocation_metadata())
        if not key_matches(metadata.get("authorization"), self.api_key):
            raise unauthorized()
        size = request.ByteSize()
        if size > self.cfg.server.max_request_bytes:
            raise APIError(413, f"request is {size} bytes; the limit is {self.cfg.server.max_request_bytes}")
        body = {"model": self.model_name, "temperature": request.temperature, "top_p": request.top_p or 1.0,
                "top_k": request.top_k, "stop": list(request.stop), "ignore_eos": request.ignore_eos,
                "prompt": list(request.prompt_token_ids) or request.prompt}
        if request.max_tokens:
            body["max_tokens"] = request.max_tokens
        if request.HasField("seed"):
            body["seed"] = request.seed
        req = validate(CompletionRequest, body)
        ids = self._prompt_ids(req)
        return ids, self._params(req, req.max_tokens, len(ids), None)

    async def _grpc_outputs(self, request, grpc_context):
        """The request's outputs, or None after setting the gRPC status of its refusal."""
        try:
            return await self._outputs(*self._grpc_request(request, grpc_context))
        except APIError as e:
            grpc_context.set_code(GRPC_CODES.get(e.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(e.message)
            return None

    async def Generate(self, request, grpc_context: RayServegRPCContext):
        outs = await self._grpc_outputs(request, grpc_context)
        if outs is None:
            return pb.GenerateResponse()
        try:
            text, toks, last = "", [], None
            async for out in outs:
                text += out.text
                toks += out.new_token_ids
                last = out
        except APIError as e:
            grpc_context.set_code(GRPC_CODES.get(e.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(e.message)
            return pb.GenerateResponse()
        return pb.GenerateResponse(text=text, token_ids=toks, finished=True, finish_reason=last.finish_reason,
                                   prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens)

    async def GenerateStream(self, request, grpc_context: RayServegRPCContext):
        outs = await self._grpc_outputs(request, grpc_context)
        if outs is None:
            return
        try:
            async for out in outs:
                yield pb.GenerateResponse(text=out.text, token_ids=out.new_token_ids, finished=out.finished,
                                          finish_reason=out.finish_reason or "", prompt_tokens=out.prompt_tokens,
                                          completion_tokens=out.completion_tokens)
        except APIError as e:
            grpc_context.set_code(GRPC_CODES.get(e.status, grpc.StatusCode.INTERNAL))
            grpc_context.set_details(e.message)

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _usage(out: RequestOutput) -> dict:
        p, c = out.prompt_tokens, out.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _piece(self, t: int) -> str:
        return self.tokenizer.sp.id_to_piece(t).replace("\u2581", " ")

    def _chat_logprobs(self, lps) -> dict:
        """OpenAI chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]} per token."""
        entry = lambda t, lp: {"token": self._piece(t), "logprob": lp, "bytes": list(self._piece(t).encode())}
        return {"content": [entry(t, lp) | {"top_logprobs": [entry(a, v) for a, v in alts]} for t, lp, alts in lps]}

    def _completion_logprobs(self, lps) -> dict:
        dec = self._piece
        return {
            "tokens": [dec(t) for t, _, _ in lps],
            "token_logprobs": [lp for _, lp, _ in lps],
            "top_logprobs": [{dec(a): v for a, v in alts} for _, _, alts in lps],
            "text_offset": [],
        }

