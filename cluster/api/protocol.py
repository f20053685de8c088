"""The OpenAI request surface as mixserve accepts it: schemas, bounded parsing, errors, the API key.

Everything a client sends is bounded before it is believed: the body by bytes as it arrives
(`read_body`), JSON by nesting depth and number length (`parse_json`), every numeric field by its
schema, every string by being valid Unicode. HTTP and gRPC requests go through the same schemas
(gRPC's proto is turned into a `CompletionRequest`), so a value is refused the same way on both.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.config import ServerConfig
from model.grammar import GrammarError, StructuredOutput
from model.sampling import (
    MAX_CACHE_SALT,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS_LIMIT,
    SEED_MAX,
    SEED_MIN,
    InvalidParam,
    SamplingParams,
)

MAX_JSON_DEPTH = 32  # the deepest real request (chat content parts) nests 4 levels
MAX_NUMBER_CHARS = 40  # a JSON number literal longer than this is refused before it is converted
INT32_MAX = 2**31 - 1
MAX_CHOICES = 128  # sequences one request may ask for: prompts x n
MAX_STOP_CHARS = 1024  # one stop string's length: each is searched for in every step's new text


class APIError(Exception):
    """A request that ends with an OpenAI-shaped error and an HTTP status (or its gRPC code)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type_,
            param,
            code,
            headers,
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unauthorized() -> APIError:
    return APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")


def key_matches(authorization: str | None, api_key: str | None) -> bool:
    """`Authorization: Bearer <key>` checked in constant time; always true when no key is set."""
    if not api_key:
        return True
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {api_key}".encode())


# ---------------------------------------------------------------- bounded JSON


def _int(s: str) -> int:
    if len(s) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number of {len(s)} digits is too long")
    return int(s)


def _float(s: str) -> float:
    if len(s) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number of {len(s)} characters is too long")
    x = float(s)
    if not math.isfinite(x):
        raise ValueError(f"{s} is out of range")
    return x


def _constant(s: str):
    raise ValueError(f"{s} is not a JSON value")


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400 that says what is wrong with it.

    Linear in the body: the C decoder reads it once (deep nesting stops it with a RecursionError long
    before the stack is at risk; number literals are bounded by `_int` / `_float` before they are
    converted), then one iterative walk checks the nesting depth and that every string is valid
    Unicode. (A regex pre-scan of the text was quadratic on an unterminated string of escapes.)"""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    _check_tree(data)
    return data


def _valid(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_tree(root: dict) -> None:
    """Nesting depth and lone UTF-16 surrogates (JSON can carry \\ud800, which has no UTF-8 form) in
    one iterative pass over the parsed value; a 400 that names where the first problem is. A node's
    path is only spelt out for containers and for the string that fails."""
    stack: list[tuple[object, str, object, int]] = [(root, "", None, 1)]
    while stack:
        x, parent, key, depth = stack.pop()
        if isinstance(x, str):
            if not _valid(x):
                where = _path(parent, key)
                top = re.match(r"[^.\[]*", where).group() or None
                raise APIError(400, f"{where or 'body'}: string is not valid Unicode (a lone surrogate)", param=top)
            continue
        where = _path(parent, key)
        if depth >= MAX_JSON_DEPTH and any(
            isinstance(v, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)
        ):
            raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(x, dict):
            for k in x:
                if not _valid(k):
                    raise APIError(400, f"{where or 'body'}: a key is not valid Unicode (a lone surrogate)")
            kids = x.items()
        else:
            kids = enumerate(x)
        stack.extend((v, where, k, depth + 1) for k, v in kids if isinstance(v, (dict, list, str)))


def _path(parent: str, key) -> str:
    """A node's place in the body: `parent[i]` in a list, `parent.key` in an object."""
    if key is None:
        return parent
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


async def read_body(request, limit: int) -> bytes:
    """The body, counted as it arrives: a declared or actual size over `limit` is a 413 before the
    rest is read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 18:
            raise APIError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes")
    return bytes(buf)


# ---------------------------------------------------------------- request schemas


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="Extension (vLLM): usage on every chunk.")


MAX_GRAMMAR_CHARS = 65536  # a regex, grammar or whitespace pattern; a schema is bounded by the body
MAX_CHOICE_STRINGS = 1024


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema. The output always follows the schema: `strict` is
    accepted either way (a keyword the grammar engine cannot enforce is a 400, never ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., max_length=64)
    description: str | None = Field(None, max_length=4096)
    json_schema: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: one constraint (json, regex, choice, grammar or json_object)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict | bool | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICE_STRINGS)] | None = None
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS, description="Lark or GBNF (EBNF).")
    json_object: bool | None = None
    disable_any_whitespace: bool = Field(False, description="JSON has no optional whitespace either way here.")
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = Field(None, max_length=1024, description="Whitespace JSON may have.")
    structural_tag: str | None = Field(None, description="Not supported: only null.")


Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class _Common(BaseModel):
    """The fields both generation routes share: OpenAI's, then vLLM's sampling extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Below 1e-5 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_STRINGS)]
        | None
    ) = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[int, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # vLLM's sampling extensions
    top_k: int = Field(0, ge=-1, le=INT32_MAX, description="0 or -1 disables it; clipped to the vocabulary.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's routed experts, opt-in per request: top-k expert ids per layer for every token
    return_routed_experts: bool = False
    return_prompt_routed_experts: bool = False
    # vLLM's prompt logprobs: each prompt token's logprob given the ones before it, with this many
    # alternatives (the first token has none: null)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # Prefix caching: only requests with the same salt share cached KV blocks (vLLM's cache_salt);
    # skip_reading_prefix_cache computes the whole prompt (mixserve's per-request opt-out)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)
    skip_reading_prefix_cache: bool = False
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs (response_format wins)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # OpenAI fields that change nothing here, accepted as vLLM accepts them; a value that would ask
    # for something this server cannot do is refused by `unsupported` (a 400 that says so)
    store: bool | None = Field(None, description="Only false or null: this server stores nothing.")
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    service_tier: Literal["auto", "default"] | None = None


def unsupported(req) -> None:
    """A 400 for an OpenAI field whose value asks for what this server cannot do (vLLM's answer too
    where it has one); the field's other values change nothing and are accepted."""
    if req.store:
        raise APIError(400, "store=true is not supported: this server stores no completions", param="store")
    tools = getattr(req, "tools", None)
    if tools:
        raise APIError(400, "tools are not supported: this server has no tool calling", param="tools")
    choice = getattr(req, "tool_choice", None)
    if choice not in (None, "none", "auto"):
        raise APIError(400, f"tool_choice={choice!r} is not supported: there are no tools", param="tool_choice")
    if getattr(req, "modalities", None) not in (None, ["text"]):
        raise APIError(400, "modalities: only ['text'] is supported", param="modalities")


def structured_output(req) -> StructuredOutput | None:
    """The request's constraint, vLLM's way: response_format json_object / json_schema replaces
    the kind that structured_outputs names (its options stay); a 400 names a field that asks for
    two kinds, or for what is not supported. Whether it compiles is checked by `GrammarCompiler`."""
    so, rf = req.structured_outputs, req.response_format
    kinds: dict[str, object] = {}
    if so is not None:
        if so.structural_tag is not None:
            raise APIError(400, "structured_outputs.structural_tag is not supported", param="structured_outputs")
        for k in ("json_", "regex", "choice", "grammar"):
            if getattr(so, k) is not None:
                kinds[k.rstrip("_")] = getattr(so, k)
        if so.json_object:
            kinds["json_object"] = True
        if len(kinds) > 1:
            raise APIError(
                400,
                f"structured_outputs: one constraint at a time, not {' and '.join(kinds)}",
                param="structured_outputs",
            )
    param = "structured_outputs"
    if rf is not None and rf.type != "text":
        param = "response_format"
        if rf.type == "json_object":
            kinds = {"json_object": True}
        else:
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise APIError(
                    400, "response_format: type json_schema needs json_schema.schema", param="response_format"
                )
            kinds = {"json": rf.json_schema.json_schema}
    if not kinds:
        return None
    ((kind, spec),) = kinds.items()
    options = {}
    if so is not None:
        options = {
            "whitespace_pattern": so.whitespace_pattern,
            "disable_additional_properties": so.disable_additional_properties,
        }
    try:
        if kind == "json":
            return StructuredOutput.json_schema(spec, param, **options)
        if kind == "choice":
            return StructuredOutput.choice(spec, param)
        if kind == "json_object":
            return StructuredOutput("json_object", "", param=param, **options)
        return StructuredOutput(kind, spec, param=param)
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param) from None


class CompletionRequest(_Common):
    prompt: (
        str
        | list[int]
        | Annotated[list[str], Field(max_length=MAX_CHOICES)]
        | Annotated[list[list[int]], Field(max_length=MAX_CHOICES)]
    )
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT, description="0 only with echo: the prompt alone.")
    logprobs: int | None = Field(None, ge=0, le=20, description="With echo: the prompt tokens' too (the first null).")
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Only equal to n (no extra candidates).")
    suffix: str | None = Field(None, max_length=65536, description="Not supported: only null or empty.")
    add_special_tokens: bool = Field(True, description="Extension (vLLM): BOS before a text prompt.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[dict], Field(max_length=256)]
    name: str | None = Field(None, max_length=256)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[dict], Field(max_length=128)] | None = Field(None, description="Only empty or null.")
    tool_choice: str | dict | None = Field(None, description="Only 'none', 'auto' or null (there are no tools).")
    parallel_tool_calls: bool | None = None
    modalities: Annotated[list[str], Field(max_length=4)] | None = Field(None, description="Only ['text'].")


class TokenizeCompletion(BaseModel):
    """vLLM's POST /tokenize with a prompt."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=256)
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(BaseModel):
    """vLLM's POST /tokenize with chat messages (the Mixtral-Instruct format always ends ready for
    the assistant's turn, so add_generation_prompt can only be true)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: Literal[True] = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=256)
    tokens: list[int]


_TYPE_TAG = re.compile(r"^(str|int|float|bool|dict|list)$|^[\w-]+\[")


def validate(schema: type[BaseModel], data: dict):
    """`data` as `schema`, or a 400 that names the field (`param`: the top-level field, as OpenAI
    does) and where inside it the first problem is."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        union = any(_TYPE_TAG.search(x) for x in loc[1:])
        where = ".".join(x for x in loc if not _TYPE_TAG.search(x)) or None
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        if union:
            msg = f"not one of the accepted forms ({msg} ...)"
        raise APIError(400, f"{where}: {msg}", param=loc[0] if loc else None) from None


# ---------------------------------------------------------------- validation against the model


_SERVER = ServerConfig.model_fields  # the limits' defaults live in the config schema alone


@dataclass(frozen=True)
class RequestBudget:
    """What one request may cost (server.max_request_* in the config): tokens to generate over all
    its choices, prompt tokens to compute over all its choices, expert ids to send back. `layers` x
    `top_k` is one token's routed experts."""

    output_tokens: int = _SERVER["max_request_output_tokens"].default
    prompt_tokens: int = _SERVER["max_request_prompt_tokens"].default
    routed_experts: int = _SERVER["max_routed_experts"].default
    layers: int = 1
    top_k: int = 1

    @classmethod
    def of(cls, server: ServerConfig, layers: int, top_k: int) -> RequestBudget:
        return cls(
            server.max_request_output_tokens, server.max_request_prompt_tokens, server.max_routed_experts, layers, top_k
        )

    def check(self, req, prompt_lens: list[int], params: list[SamplingParams]) -> None:
        """A 400 naming the limit when the request's choices together cost more than it allows."""
        out = sum(sp.max_tokens for sp in params)
        if out > self.output_tokens:
            raise APIError(
                400,
                f"{len(params)} choices x max_tokens ask for {out} tokens; one request may ask for at most "
                f"{self.output_tokens} (server.max_request_output_tokens)",
                param="max_tokens",
                code="request_too_costly",
            )
        n = len(params) // max(1, len(prompt_lens))
        prompt = n * sum(prompt_lens)
        if prompt > self.prompt_tokens:
            raise APIError(
                400,
                f"{len(params)} choices x their prompts are {prompt} tokens to compute; one request may have at "
                f"most {self.prompt_tokens} (server.max_request_prompt_tokens)",
                param="n",
                code="request_too_costly",
            )
        routes = (out if req.return_routed_experts else 0) + (
            sum(prompt_lens) if req.return_prompt_routed_experts else 0  # once per prompt
        )
        if routes * self.layers * self.top_k > self.routed_experts:
            raise APIError(
                400,
                f"the routed experts asked for are {routes * self.layers * self.top_k} expert ids; one request may "
                f"ask for at most {self.routed_experts} (server.max_routed_experts)",
                param="return_routed_experts" if req.return_routed_experts else "return_prompt_routed_experts",
                code="request_too_costly",
            )


class ModelLimits:
    """What a request is checked against once it parses: the vocabulary, the context and what one
    request may cost. One place for HTTP and gRPC alike."""

    def __init__(
        self, name: str, vocab: int, max_model_len: int, max_tokens_default: int, budget: RequestBudget | None = None
    ):
        self.name, self.vocab, self.max_model_len, self.max_tokens_default = (
            name,
            vocab,
            max_model_len,
            max_tokens_default,
        )
        self.budget = budget or RequestBudget()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.name!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def check_token_ids(self, ids: list[int], param: str, allow_empty: bool = False) -> list[int]:
        if (not ids and not allow_empty) or (ids and (min(ids) < 0 or max(ids) >= self.vocab)):
            raise APIError(
                400,
                f"{param}: token ids must be {'' if allow_empty else 'non-empty and '}in [0, {self.vocab})",
                param=param,
            )
        return list(ids)

    def sampling_params(
        self,
        req,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        param: str,
        seed_offset: int = 0,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The request's sampling parameters for a prompt of `prompt_len` tokens: context length,
        token ranges and every value checked; choice `seed_offset` of n gets seed + offset (vLLM's
        rule, so that each choice is its own reproducible sequence)."""
        if prompt_len >= self.max_model_len:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len} tokens",
                param=param,
                code="context_length_exceeded",
            )
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = min(self.max_tokens_default, room)
        elif max_tokens > room:
            raise APIError(
                400,
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                f"context of {self.max_model_len} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens={req.min_tokens} is more than max_tokens={max_tokens}", param="min_tokens")
        self.check_token_ids(req.stop_token_ids, "stop_token_ids", allow_empty=True)
        bias = req.logit_bias or {}
        self.check_token_ids(list(bias), "logit_bias", allow_empty=True)
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        seed = req.seed
        if seed is not None and seed_offset:
            seed = (seed + seed_offset - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=seed,
                stop=stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                logit_bias=bias,
                min_p=req.min_p,
                min_tokens=req.min_tokens,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                return_routed_experts=req.return_routed_experts,
                return_prompt_routed_experts=req.return_prompt_routed_experts,
                cache_salt=req.cache_salt,
                skip_reading_prefix_cache=req.skip_reading_prefix_cache,
            )
        except InvalidParam as e:
            raise APIError(400, str(e), param=e.param) from None
        except ValueError as e:  # a value no field check names (none is known; kept a 400 all the same)
            raise APIError(400, str(e)) from None
