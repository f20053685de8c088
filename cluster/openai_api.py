"""OpenAI-compatible HTTP ingress (FastAPI inside Ray Serve).

    client --HTTP--> OpenAIIngress: auth, size limit, parse + validate, tokenise / chat format
                     --streaming handle--> AttentionWorker.generate --> outputs --> JSON or SSE

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 bad
key, 404 unknown model or route, 413 body too large, 503 overloaded (with Retry-After). A bad request
is answered here and never reaches a worker.
"""

import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
import grpc
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.grpc_util import RayServegRPCContext
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.config import MixtralConfig
from model.sampling import SamplingParams
from model.tiny import resolve_model
from model.tokenizer import ChatFormatError, Tokenizer

from .config import AppConfig
from .proto import mixserve_pb2 as pb
from .metrics import Metrics

log = logging.getLogger(__name__)
# A streaming call fails with these when its attention replica's process is gone.
ATTENTION_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)

api = FastAPI(title="mixserve", description="OpenAI-compatible API of mixserve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


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


# ---------------------------------------------------------------- request schemas


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="Extension: 0 disables it.")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[dict]
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int) or True)
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return APIError(400, f"{loc}: {msg}", param=loc or None)


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
        self.created = int(time.time())
        self.metrics = Metrics()
        self.app_name = serve.get_replica_context().app_name


    # ------------------------------------------------------------ shared checks

    async def _body(self, request: Request, schema):
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        raw = await request.body()
        if len(raw) > self.cfg.server.max_request_bytes:
            raise APIError(413, f"request body is {len(raw)} bytes; the limit is {self.cfg.server.max_request_bytes}")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "request body is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        for p in ("presence_penalty", "frequency_penalty"):
            if getattr(req, p):
                raise APIError(400, f"{p} is not supported (must be 0)", param=p)
        return req

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
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  seed=req.seed, stop=req.stop or [], ignore_eos=req.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _outputs(self, prompt_ids: list[int], sp: SamplingParams):
        """The request's outputs, with the first one already received: a refusal (overload) becomes
        an HTTP status before any byte of a stream is sent."""
        params = {k: getattr(sp, k) for k in SamplingParams.__dataclass_fields__}
        t0 = time.perf_counter()
        outs = self._resilient(prompt_ids, params)
        try:
            first = await outs.__anext__()
        except Exception as e:  # noqa: BLE001 - the worker's refusal, mapped to an HTTP status
            if "Overloaded" in type(e).__name__ or "Overloaded" in str(e)[:300]:
                raise APIError(503, "the server is overloaded; retry later", "server_error", code="overloaded",
                               headers={"Retry-After": "1"}) from None
            raise
        m = self.metrics
        m.prompt_tokens.inc(len(prompt_ids))
        if first["new_token_ids"]:
            m.ttft.observe(time.perf_counter() - t0)

        async def rest():
            finished, last = False, time.perf_counter()
            try:
                out = first
                while True:
                    finished = out["finished"]
                    n = len(out["new_token_ids"])
                    m.generated_tokens.inc(n)
                    if out is not first and n:
                        now = time.perf_counter()
                        m.itl.observe((now - last) / n)
                        last = now
                    yield out
                    if finished:
                        return
                    out = await outs.__anext__()
            finally:
                if not finished:  # the client went away: free the sequence
                    await outs.aclose()

        return rest()

    async def _resilient(self, prompt_ids: list[int], params: dict):
        """One request's outputs from an attention replica. If that replica dies mid-request, the
        request is re-submitted (prompt + the tokens generated so far, the rest of max_tokens) to
        another replica, which re-prefills and goes on; the caller sees one uninterrupted stream whose
        usage counts the original prompt. Greedy decoding gives the tokens of an undisturbed run."""
        done: list[int] = []
        resubmits = 0
        while True:
            p = dict(params, max_tokens=params["max_tokens"] - len(done))
            resp = self.attention.options(stream=True).generate.remote(prompt_ids + done, p)
            try:
                while True:
                    try:
                        out = await resp.__anext__()
                    except StopAsyncIteration:
                        return
                    done += out["new_token_ids"]
                    out["prompt_tokens"] = len(prompt_ids)
                    out["completion_tokens"] = len(done)
                    yield out
                    if out["finished"]:
                        return
            except ATTENTION_LOST as e:
                resp.cancel()
                resubmits += 1
                if resubmits > self.cfg.attention.max_resubmits:
                    raise
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
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
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
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            if not prompt or min(prompt) < 0 or max(prompt) >= self.vocab:
                raise APIError(400, f"prompt token ids must be non-empty and in [0, {self.vocab})", param="prompt")
            ids = list(prompt)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        sp = self._params(req, req.max_tokens, len(ids), req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return self._sse(self._stream_completion(rid, req, await self._outputs(ids, sp)))
        text, lps, last = await self._collect(await self._outputs(ids, sp))
        choice = {"index": 0, "text": text, "finish_reason": last["finish_reason"],
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
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last["finish_reason"],
                  "logprobs": self._chat_logprobs(lps) if req.logprobs else None}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": [choice], "usage": self._usage(last)}

    @staticmethod
    async def _collect(outs) -> tuple[str, list, dict]:
        """A whole non-streamed answer: its text, its logprobs, and the final output (usage, reason)."""
        text, lps, last = "", [], None
        async for out in outs:
            text += out["text"]
            lps += out["logprobs"]
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
                if out["finished"] and (req.stream_options or {}).get("include_usage"):
                    chunk["usage"] = self._usage(out)
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:  # after the first byte a status can no longer change: an error event
            yield f"data: {json.dumps(error_body(e))}\n\n"
        yield "data: [DONE]\n\n"

    def _stream_completion(self, rid, req, outs):
        def choice_of(out):
            if not (out["text"] or out["finished"]):
                return None
            return {"index": 0, "text": out["text"], "finish_reason": out["finish_reason"] if out["finished"] else None,
                    "logprobs": self._completion_logprobs(out["logprobs"]) if req.logprobs is not None else None}

        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        return self._events(head, req, outs, choice_of)

    def _stream_chat(self, rid, req, outs):
        def choice_of(out):
            if not (out["text"] or out["finished"] or (req.logprobs and out["logprobs"])):
                return None
            return {"index": 0, "delta": {"content": out["text"]} if out["text"] else {},
                    "finish_reason": out["finish_reason"] if out["finished"] else None,
                    "logprobs": self._chat_logprobs(out["logprobs"]) if req.logprobs else None}

        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_name}
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return self._events(head, req, outs, choice_of, first)

    # ------------------------------------------------------------ gRPC (mixserve.v1.MixServe)

    def _grpc_request(self, request, grpc_context):
        """proto GenerateRequest -> (prompt ids, SamplingParams); INVALID_ARGUMENT on bad input."""
        try:
            ids = list(request.prompt_token_ids) or self.tokenizer.encode(request.prompt)
            if min(ids) < 0 or max(ids) >= self.vocab:
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab})")
            if len(ids) >= self.max_model_len:
                raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens")
            room = self.max_model_len - len(ids)
            mt = request.max_tokens or min(self.cfg.server.max_tokens_default, room)
            if mt > room:
                raise APIError(400, f"max_tokens={mt} plus the prompt exceeds the context of {self.max_model_len}")
            sp = SamplingParams(max_tokens=mt, temperature=request.temperature, top_p=request.top_p or 1.0,
                                top_k=request.top_k, seed=request.seed if request.HasField("seed") else None,
                                stop=list(request.stop), ignore_eos=request.ignore_eos)
            return ids, sp
        except (APIError, ValueError) as e:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(getattr(e, "message", str(e)))
            return None

    async def Generate(self, request, grpc_context: RayServegRPCContext):
        parsed = self._grpc_request(request, grpc_context)
        if parsed is None:
            return pb.GenerateResponse()
        text, toks, last = "", [], None
        async for out in await self._outputs(*parsed):
            text += out["text"]
            toks += out["new_token_ids"]
            last = out
        return pb.GenerateResponse(text=text, token_ids=toks, finished=True, finish_reason=last["finish_reason"],
                                   prompt_tokens=last["prompt_tokens"], completion_tokens=last["completion_tokens"])

    async def GenerateStream(self, request, grpc_context: RayServegRPCContext):
        parsed = self._grpc_request(request, grpc_context)
        if parsed is None:
            return
        async for out in await self._outputs(*parsed):
            yield pb.GenerateResponse(text=out["text"], token_ids=out["new_token_ids"], finished=out["finished"],
                                      finish_reason=out["finish_reason"] or "", prompt_tokens=out["prompt_tokens"],
                                      completion_tokens=out["completion_tokens"])

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _usage(out) -> dict:
        p, c = out["prompt_tokens"], out["completion_tokens"]
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
