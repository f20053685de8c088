"""The OpenAI serving logic: requests in, responses out, independent of HTTP and Serve.

    CompletionRequest / ChatRequest (cluster/api/protocol.py: parsed, bounded, schema-checked)
      -> prompts (text, token ids, lists of either; chat format) x n choices
      -> one engine sequence per choice (`outputs`: the ingress's call into an attention replica)
      -> one response: choices numbered as OpenAI does (prompt i, choice j -> index i * n + j),
         usage summed, or an SSE stream of chunks, usage in a final chunk with empty `choices`

The routes (cluster/api/ingress.py) only read, authenticate and frame; this module decides what a
request means. vLLM splits its entrypoints the same way (protocol / serving / router).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from cluster.api.protocol import (
    MAX_CHOICES,
    APIError,
    ChatRequest,
    CompletionRequest,
    Detokenize,
    ModelLimits,
    TokenizeChat,
    TokenizeCompletion,
    structured_output,
    unsupported,
)
from model.grammar import GrammarError, StructuredOutput, compiler_for
from model.sampling import SamplingParams
from model.tokenizer import ChatFormatError, TokenizeError, Tokenizer
from router.engine import FinishReason, RequestOutput

log = logging.getLogger(__name__)

# (each choice's prompt ids, each choice's sampling params, group) -> the choices' outputs as batches
# of (choice index, output), the first batch already received (a refusal is an APIError before
# anything is sent). `group` names whose fair share the choices run in: the request's, or its
# user's when the request names one.
Batches = AsyncIterator[list[tuple[int, RequestOutput]]]
Outputs = Callable[[list[list[int]], list[SamplingParams], str], Awaitable[Batches]]
# Prompts longer than this (characters) are tokenised in a worker thread, off the event loop
# (SentencePiece releases the GIL): other streams keep flowing while a 1 MiB prompt is encoded.
OFF_LOOP_CHARS = 16384


@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # for echo; decoded from the ids when the prompt was given as ids


def with_routes(choice: dict, req, out: RequestOutput) -> dict:
    """vLLM's routed-expert fields on a choice, when the request asked for them."""
    if req.return_routed_experts:
        choice["routed_experts"] = out.routed_experts or []
    if req.return_prompt_routed_experts and out.prompt_routed_experts is not None:
        choice["prompt_routed_experts"] = out.prompt_routed_experts
    return choice


def _prompt_chars(p) -> int:
    return len(p) if isinstance(p, str) else sum(len(x) for x in p if isinstance(x, str)) + len(p)


def _chat_chars(messages) -> int:
    return sum(len(m.content) if isinstance(m.content, str) else 64 * len(m.content) for m in messages)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage; with `cached_tokens`, its prompt_tokens_details (prompt tokens found in the prefix cache)."""
    u = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def cached_of(outs, n: int) -> int:
    """The prompt tokens found in the prefix cache, each prompt counted once (by its first choice)."""
    return sum(o.cached_tokens or 0 for k, o in enumerate(outs) if k % n == 0)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


class OpenAIServing:
    def __init__(self, tokenizer: Tokenizer, limits: ModelLimits, outputs: Outputs):
        self.tokenizer, self.limits, self.outputs = tokenizer, limits, outputs

    # ------------------------------------------------------------ requests -> sequences

    @staticmethod
    async def _off_loop(fn, req, chars: int):
        return fn(req) if chars < OFF_LOOP_CHARS else await asyncio.to_thread(fn, req)

    def _encode(self, text: str, param: str, bos: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, bos=bos)
        except TokenizeError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    async def prompts_of(self, req: CompletionRequest) -> list[Prompt]:
        """`completion_prompts`, a long one tokenised off the event loop."""
        return await self._off_loop(self.completion_prompts, req, _prompt_chars(req.prompt))

    async def chat_prompt_of(self, req: ChatRequest | TokenizeChat) -> Prompt:
        """`chat_prompt`, long messages formatted and tokenised off the event loop."""
        return await self._off_loop(self.chat_prompt, req, _chat_chars(req.messages))

    def completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        p = req.prompt
        if isinstance(p, str):
            items = [p]
        elif not p:
            raise APIError(400, "prompt: an empty list", param="prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        out = []
        for i, item in enumerate(items):
            where = "prompt" if len(items) == 1 else f"prompt[{i}]"
            if isinstance(item, str):
                ids = self._encode(item, where, bos=req.add_special_tokens)
                if not ids:
                    raise APIError(400, f"{where}: the prompt is empty (no tokens)", param="prompt")
                out.append(Prompt(ids, item))
            else:
                ids = self.limits.check_token_ids(item, "prompt")
                out.append(Prompt(ids, self.tokenizer.decode(ids) if req.echo else None))
        return out

    def chat_prompt(self, req: ChatRequest) -> Prompt:
        try:
            return Prompt(self.tokenizer.encode_chat([m.model_dump() for m in req.messages]), None)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None

    async def _structured(self, req) -> StructuredOutput | None:
        """The request's constraint, compiled once here (off the event loop; cached) so that a bad
        schema, regex or grammar is a 400 that names its field before anything starts."""
        c = structured_output(req)
        if c is None:
            return None
        try:
            await asyncio.to_thread(lambda: compiler_for(self.tokenizer, self.limits.vocab).check(c))
        except GrammarError as e:
            raise APIError(400, str(e), param=e.param) from None
        return c

    @staticmethod
    def _check_prompt_logprobs(req) -> None:
        if req.stream and req.prompt_logprobs is not None:  # vLLM's rule too
            raise APIError(400, "prompt_logprobs are not available with stream=true", param="prompt_logprobs")

    def _choices(
        self,
        req,
        prompts: list[Prompt],
        max_tokens: int | None,
        logprobs: int | None,
        param: str,
        prompt_logprobs: int | None = None,
        structured: StructuredOutput | None = None,
    ) -> list[SamplingParams]:
        """One SamplingParams per choice, index i * n + j: every value checked before any starts."""
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={req.n} choices is over the limit of {MAX_CHOICES} sequences per request",
                param="n",
            )
        if req.user:
            log.debug("request", extra={"user": req.user, "choices": len(prompts) * req.n})
        params = [
            self.limits.sampling_params(req, len(p.ids), max_tokens, logprobs, param, j, prompt_logprobs)
            for p in prompts
            for j in range(req.n)
        ]
        self.limits.budget.check(req, [len(p.ids) for p in prompts], params)
        for k, sp in enumerate(params):  # a prompt's routes and logprobs are each of its choices': computed once
            sp.structured = structured
            if k % req.n:
                sp.return_prompt_routed_experts = False
                sp.prompt_logprobs = None
        return params

    async def _start(self, req, prompts: list[Prompt], params: list[SamplingParams], n: int) -> Batches:
        """Every choice's sequence, in one call to one attention replica (so that the choices of a
        prompt share its prefill), admitted together: a refusal of one is the request's."""
        group = f"user:{req.user}" if req.user else f"req:{uuid.uuid4().hex}"
        return await self.outputs([prompts[k // n].ids for k in range(len(params))], params, group)

    # ------------------------------------------------------------ completions

    async def completions(self, req: CompletionRequest):
        """A response body (dict) or, for stream=true, an async iterator of SSE lines."""
        self.limits.check_model(req.model)
        unsupported(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(
                400, f"best_of={req.best_of} must equal n={req.n} (no extra candidates are generated)", param="best_of"
            )
        self._check_prompt_logprobs(req)
        zero = req.max_tokens == 0
        if zero and not req.echo:
            raise APIError(400, "max_tokens=0 only with echo (the prompt alone, scored)", param="max_tokens")
        echo_lps = req.echo and req.logprobs is not None  # the prompt tokens' logprobs lead the choice's
        wanted = [x for x in (req.logprobs if echo_lps else None, req.prompt_logprobs) if x is not None]
        structured = await self._structured(req)
        prompts = await self.prompts_of(req)
        # max_tokens=0: one token is computed (the prompt's last logits) and not returned
        params = self._choices(
            req, prompts, 1 if zero else req.max_tokens, req.logprobs, "prompt", max(wanted, default=None), structured
        )
        streams = await self._start(req, prompts, params, req.n)
        if zero:
            streams = _no_generation(streams)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.limits.name}
        prompt_tokens = sum(len(p.ids) for p in prompts)
        echo = [prompts[k // req.n].text if req.echo else "" for k in range(len(params))]
        if req.stream:
            ids = [prompts[k // req.n].ids for k in range(len(params))]
            chunk = self._completion_chunk(req, (echo, ids) if echo_lps else None, req.n)
            return self._stream(
                req, head, streams, len(params), prompt_tokens, chunk, None if echo_lps else echo, n=req.n
            )
        outs = await self._collect(streams, len(params))
        for k, o in enumerate(outs):  # a prompt's logprobs were computed for its first choice
            o.prompt_logprobs = outs[k - k % req.n].prompt_logprobs
        choices = [
            with_routes(
                {
                    "index": k,
                    "text": echo[k] + o.text,
                    "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason,
                    "logprobs": self._completion_logprobs(
                        o.logprobs, prompts[k // req.n].ids, o.prompt_logprobs if echo_lps else None, req.logprobs or 0
                    )
                    if req.logprobs is not None
                    else None,
                }
                | self._prompt_logprobs_field(req, o),
                req,
                o,
            )
            for k, o in enumerate(outs)
        ]
        done = sum(o.completion_tokens for o in outs)
        body = head | {"choices": choices, "usage": usage(prompt_tokens, done, cached_of(outs, req.n))}
        if req.return_prompt_routed_experts and len(prompts) == 1:  # vLLM's place for one prompt
            body["prompt_routed_experts"] = outs[0].prompt_routed_experts
        return body

    def _completion_chunk(self, req, echo: tuple[list[str], list[list[int]]] | None = None, n: int = 1):
        """Each output as a chunk's choice. With `echo` (echo + logprobs), a choice's first chunk leads
        with the prompt and its tokens' logprobs, which arrive with the first output; the choices of a
        prompt after its first take the first one's."""
        prompt_lps: dict[int, list] = {}
        started: set[int] = set()

        def choice_of(k: int, out: RequestOutput) -> dict | None:
            if out.prompt_logprobs is not None:
                prompt_lps[k - k % n] = out.prompt_logprobs
            first = k not in started
            started.add(k)
            out.prompt_logprobs = prompt_lps.get(k - k % n) if first and echo is not None else None
            lead = echo[0][k] if echo is not None and first else ""
            if not (lead or out.text or out.finished or out.routed_experts or out.prompt_routed_experts):
                return None
            lps = None
            if req.logprobs is not None:
                lead_lps = out.prompt_logprobs if echo is not None and first else None
                lps = self._completion_logprobs(out.logprobs, echo[1][k] if lead_lps else None, lead_lps, req.logprobs)
            return with_routes(
                {
                    "index": k,
                    "text": lead + out.text,
                    "finish_reason": out.finish_reason if out.finished else None,
                    "stop_reason": out.stop_reason if out.finished else None,
                    "logprobs": lps,
                },
                req,
                out,
            )

        return choice_of

    # ------------------------------------------------------------ chat

    async def chat(self, req: ChatRequest):
        self.limits.check_model(req.model)
        unsupported(req)
        self._check_prompt_logprobs(req)
        structured = await self._structured(req)
        prompt = await self.chat_prompt_of(req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self._choices(
            req, [prompt], req.max_completion_tokens or req.max_tokens, top, "messages", req.prompt_logprobs, structured
        )
        streams = await self._start(req, [prompt], params, req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.limits.name}
        if req.stream:
            head["object"] = "chat.completion.chunk"
            first = [
                {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for k in range(len(params))
            ]
            chunk = self._chat_chunk(req)
            return self._stream(req, head, streams, len(params), len(prompt.ids), chunk, first=first, n=req.n)
        outs = await self._collect(streams, len(params))
        choices = [
            with_routes(
                {
                    "index": k,
                    "message": {"role": "assistant", "content": o.text},
                    "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason,
                    "logprobs": self._chat_logprobs(o.logprobs) if req.logprobs else None,
                },
                req,
                o,
            )
            for k, o in enumerate(outs)
        ]
        done = sum(o.completion_tokens for o in outs)
        body = head | {"choices": choices, "usage": usage(len(prompt.ids), done, cached_of(outs, req.n))}
        if req.return_prompt_routed_experts:
            body["prompt_routed_experts"] = outs[0].prompt_routed_experts
        if req.prompt_logprobs is not None:  # vLLM's place in chat: the response's
            body["prompt_logprobs"] = self.prompt_logprobs(outs[0].prompt_logprobs, req.prompt_logprobs)
        return body

    def _chat_chunk(self, req):
        def choice_of(k: int, out: RequestOutput) -> dict | None:
            if not (
                out.text
                or out.finished
                or (req.logprobs and out.logprobs)
                or out.routed_experts
                or out.prompt_routed_experts
            ):
                return None
            return with_routes(
                {
                    "index": k,
                    "delta": {"content": out.text} if out.text else {},
                    "finish_reason": out.finish_reason if out.finished else None,
                    "stop_reason": out.stop_reason if out.finished else None,
                    "logprobs": self._chat_logprobs(out.logprobs) if req.logprobs else None,
                },
                req,
                out,
            )

        return choice_of

    # ------------------------------------------------------------ collecting and streaming

    @staticmethod
    async def _collect(batches: Batches, count: int) -> list[RequestOutput]:
        """Whole answers: each choice's outputs merged into one (text, logprobs, routes, the final
        reasons and usage), joined once at the end."""
        parts: list[list[RequestOutput]] = [[] for _ in range(count)]
        try:
            async for batch in batches:
                for k, out in batch:
                    parts[k].append(out)
        finally:
            await batches.aclose()
        return [RequestOutput.joined(p) for p in parts]

    async def _stream(
        self,
        req,
        head: dict,
        batches: Batches,
        count: int,
        prompt_tokens: int,
        choice_of,
        echo: list[str] | None = None,
        first: list[dict] | None = None,
        n: int = 1,
    ) -> AsyncIterator[str]:
        """SSE framing for both routes: opening chunks (chat's role, completions' echoed prompt), a
        chunk per output that `choice_of` turns into a choice, then, when asked, a last chunk whose
        `choices` is empty and that alone carries `usage` (OpenAI's include_usage); vLLM's
        continuous_usage_stats adds usage so far to every chunk. An error after the first byte is
        an error event; [DONE] always ends the stream."""
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        done_tokens = [0] * count
        cached = [0] * count  # each choice's prompt tokens from the prefix cache (its first output says)

        def chunk(choices: list[dict]) -> str:
            c = head | {"choices": choices}
            if continuous:
                c["usage"] = usage(prompt_tokens, sum(done_tokens), sum(cached[::n]))
            return sse(c)

        try:
            for opening in first or []:
                yield chunk([opening])
            for k, text in enumerate(echo or []):
                if text:
                    yield chunk(
                        [{"index": k, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None}]
                    )
            async for batch in batches:  # a step's chunks of every choice: one write, one hop to the proxy
                events = []
                for k, out in batch:
                    done_tokens[k] = out.completion_tokens
                    if out.cached_tokens is not None:
                        cached[k] = out.cached_tokens
                    choice = choice_of(k, out)
                    if choice is not None:
                        events.append(chunk([choice]))
                if events:
                    yield "".join(events)
            if include_usage:
                yield sse(head | {"choices": [], "usage": usage(prompt_tokens, sum(done_tokens), sum(cached[::n]))})
        except APIError as e:  # after the first byte a status can no longer change: an error event
            yield sse(e.body())
        except Exception as e:  # noqa: BLE001 - whatever ended the stream, the client gets an error and [DONE]
            log.exception("stream failed")
            yield sse(APIError(500, f"the stream failed: {type(e).__name__}", "server_error").body())
        finally:
            await batches.aclose()  # the client went away, or the stream ended: nothing left running
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ tokenize / detokenize (vLLM's)

    async def tokenize(self, req: TokenizeCompletion | TokenizeChat) -> dict:
        self.limits.check_model(req.model)
        if isinstance(req, TokenizeChat):  # the Mixtral-Instruct format starts with BOS itself
            ids = (await self.chat_prompt_of(req)).ids
        else:
            encode = lambda r: self._encode(r.prompt, "prompt", bos=r.add_special_tokens)
            ids = await self._off_loop(encode, req, len(req.prompt))
        return {
            "count": len(ids),
            "max_model_len": self.limits.max_model_len,
            "tokens": ids,
            "token_strs": [self.tokenizer.sp.id_to_piece(t) for t in ids] if req.return_token_strs else None,
        }

    async def detokenize(self, req: Detokenize) -> dict:
        self.limits.check_model(req.model)
        ids = self.limits.check_token_ids(req.tokens, "tokens", allow_empty=True)
        known = self.tokenizer.vocab_size  # a model may pad its vocabulary past the tokenizer's
        if ids and max(ids) >= known:
            raise APIError(
                400, f"tokens: {max(ids)} is not a token of the tokenizer (its ids are [0, {known}))", param="tokens"
            )
        return {"prompt": await self._off_loop(self.tokenizer.decode, ids, len(ids) * 4)}

    # ------------------------------------------------------------ logprobs

    def _chat_logprobs(self, lps) -> dict:
        """OpenAI chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]} per token."""
        piece = self.tokenizer.piece
        entry = lambda t, lp: {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
        return {"content": [entry(t, lp) | {"top_logprobs": [entry(a, v) for a, v in alts]} for t, lp, alts in lps]}

    def _completion_logprobs(self, lps, prompt_ids: list[int] | None = None, prompt_lps=None, top: int = 0) -> dict:
        """OpenAI's legacy format. With the prompt (echo + logprobs): its tokens lead, the first with
        null logprobs (nothing comes before it), each other with its `top` most likely alternatives."""
        piece = self.tokenizer.piece
        ids = list(prompt_ids or []) if prompt_lps else []
        head = (prompt_lps or [])[: len(ids)]
        tokens = [piece(t) for t in ids] + [piece(t) for t, _, _ in lps]
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [h[1] if h else None for h in head] + [lp for _, lp, _ in lps],
            "top_logprobs": [{piece(a): v for a, v in h[3][:top]} if h else None for h in head]
            + [{piece(a): v for a, v in alts} for _, _, alts in lps],
            "text_offset": offsets,
        }

    def _prompt_logprobs_field(self, req, out: RequestOutput) -> dict:
        """vLLM's `prompt_logprobs` when asked: per prompt token, null for the first, else
        {token id: {logprob, rank, decoded_token}} for the token and its top alternatives."""
        if req.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": self.prompt_logprobs(out.prompt_logprobs, req.prompt_logprobs)}

    def prompt_logprobs(self, lps: list | None, top: int) -> list | None:
        if lps is None:
            return None
        piece = self.tokenizer.piece
        out: list = []
        for h in lps:
            if h is None:
                out.append(None)
                continue
            t, lp, rank, alts = h
            entry = {str(t): {"logprob": lp, "rank": rank, "decoded_token": piece(t)}}
            for r, (a, v) in enumerate(alts[:top], start=1):
                entry.setdefault(str(a), {"logprob": v, "rank": r, "decoded_token": piece(a)})
            out.append(entry)
        return out


async def _no_generation(batches: Batches):
    """max_tokens=0: the one token computed for the prompt's last position is not the client's: every
    output without it (no text, tokens or logprobs; 0 completion tokens; finished by length)."""
    import dataclasses

    try:
        async for batch in batches:
            yield [
                (
                    k,
                    dataclasses.replace(
                        o,
                        new_token_ids=[],
                        text="",
                        logprobs=[],
                        completion_tokens=0,
                        routed_experts=[] if o.routed_experts is not None else None,
                        finish_reason=FinishReason.LENGTH if o.finished and o.error is None else o.finish_reason,
                        stop_reason=None,
                    ),
                )
                for k, o in batch
            ]
    finally:
        await batches.aclose()


class StallGuard:
    """A stream body (SSE chunks, gRPC messages) that is closed when its client stops reading.

    Behind HAProxy the ingress writes each chunk to the client's connection itself (direct ingress).
    That write waits once the buffers on the way are full: HAProxy's, the sockets', and uvicorn's
    high-water mark, or gRPC's flow-control window. So a write that has not come back for
    `timeout_s` means a client that reads nothing. The guard then closes the body, which aborts the
    request's unfinished choices and frees their sequences. The time spent waiting for the engine
    between chunks does not count."""

    def __init__(self, body, timeout_s: float, on_stall=None):
        self.body, self.timeout_s, self.on_stall = body, timeout_s, on_stall
        self.timer: asyncio.TimerHandle | None = None
        self.stalled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.stalled:
            raise StopAsyncIteration
        chunk = await self.body.__anext__()
        # by weak reference: a consumer that is gone (client disconnected mid-write) drops the guard
        # and its body, and the timer then does nothing
        self.timer = asyncio.get_running_loop().call_later(self.timeout_s, _stalled, weakref.ref(self))
        return chunk

    def _stall(self) -> None:
        self.stalled = True
        log.warning("stream aborted: its client has read nothing", extra={"stall_s": self.timeout_s})
        if self.on_stall is not None:
            self.on_stall()
        self._closing = asyncio.ensure_future(self.body.aclose())  # kept: the task must not be collected


def _stalled(ref: weakref.ref) -> None:
    guard = ref()
    if guard is not None:
        guard._stall()
