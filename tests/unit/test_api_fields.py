"""OpenAI fields that change nothing here are accepted as vLLM's server accepts them; values that ask
for what mixserve cannot do get a 400 that says so (not "unknown field"); fields nobody defines stay
refused. The serving layer alone, against a recording stand-in for the engine."""

from __future__ import annotations

import asyncio

import pytest

from cluster.api.protocol import APIError, ChatRequest, CompletionRequest, ModelLimits, validate
from cluster.api.serving import OpenAIServing
from model.tokenizer import Tokenizer

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi"}


@pytest.fixture(scope="module")
def serving():
    started = []

    async def outputs(prompts, params, group):
        started.append(len(prompts))
        raise APIError(503, "reached the engine")

    return OpenAIServing(Tokenizer(), ModelLimits(MODEL, 32000, 4096, 16), outputs), started


def answer(serving, schema, body) -> APIError:
    s, _ = serving
    req = validate(schema, body)
    with pytest.raises(APIError) as e:
        asyncio.run(s.chat(req) if schema is ChatRequest else s.completions(req))
    return e.value


@pytest.mark.parametrize(
    "extra",
    [
        {"store": False},
        {"metadata": {"team": "search"}},
        {"service_tier": "auto"},
        {"tools": []},
        {"tool_choice": "none"},
        {"parallel_tool_calls": False},
        {"modalities": ["text"]},
    ],
)
def test_no_op_fields_are_accepted(serving, extra):
    schema, body = (
        (ChatRequest, CHAT)
        if set(extra) & {"tools", "tool_choice", "parallel_tool_calls", "modalities"}
        else (CompletionRequest, COMPLETION)
    )
    e = answer(serving, schema, body | extra)
    assert e.status == 503 and e.message == "reached the engine", extra  # accepted: the engine was asked


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"store": True}, "store"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_fields_that_cannot_be_honoured_say_so(serving, extra, param):
    e = answer(serving, ChatRequest, CHAT | extra)
    assert e.status == 400 and e.param == param and ("not supported" in e.message or "only" in e.message)


def test_fields_nobody_defines_stay_refused():
    for body in (CHAT | {"stor": False}, COMPLETION | {"tools_": []}, COMPLETION | {"service_tier": "flex"}):
        schema = ChatRequest if "messages" in body else CompletionRequest
        with pytest.raises(APIError) as e:
            validate(schema, body)
        assert e.value.status == 400
