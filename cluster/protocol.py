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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.sampling import MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, SEED_MAX, SEED_MIN

MAX_JSON_DEPTH = 32  # the deepest real request (chat content parts) nests 4 levels
MAX_NUMBER_CHARS = 40  # a JSON number literal longer than this is refused before it is converted
INT32_MAX = 2**31 - 1


class APIError(Exception):
    """A request that ends with an OpenAI-shaped error and an HTTP status (or its gRPC code)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers

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


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    deepest = depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


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
    """A request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    bad = _invalid_string(data, "")
    if bad is not None:
        raise APIError(400, f"{bad or 'body'}: string is not valid Unicode (a lone surrogate)", param=bad or None)
    return data


def _invalid_string(x, where: str) -> str | None:
    """Where the first string with a lone UTF-16 surrogate is, or None."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(x, dict):
        for k, v in x.items():
            found = _invalid_string(k, where) if isinstance(k, str) else None
            found = found if found is not None else _invalid_string(v, f"{where}.{k}" if where else str(k))
            if found is not None:
                return found
    elif isinstance(x, list):
        for i, v in enumerate(x):
            found = _invalid_string(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


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
    continuous_usage_stats: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Below 1e-5 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=INT32_MAX, description="Extension: 0 or -1 disables it; clipped to the vocabulary.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64, description="Extension.")
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="Extension (vLLM); only 1 (off) so far.")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict]
    name: str | None = Field(None, max_length=256)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def validate(schema: type[BaseModel], data: dict):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise APIError(400, f"{loc}: {msg}", param=loc or None) from None
