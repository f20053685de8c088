"""What one request may cost, checked without a server: parsing in linear time, the per-request
budget (choices x tokens, prompts x choices, routed experts) refused with a 400 naming its limit, a
detokeniser whose window stays bounded, stop strings bounded, ids past the tokenizer refused, and the
stats of several attention replicas summed for /metrics. The same through the real server, while
other streams run, is tests/test_cost_isolation.py."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from cluster.api.metrics import AttentionStats
from cluster.api.protocol import (
    MAX_JSON_DEPTH,
    APIError,
    ChatRequest,
    CompletionRequest,
    ModelLimits,
    RequestBudget,
    parse_json,
    validate,
)
from cluster.api.serving import OpenAIServing
from model.tokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer, Tokenizer

MODEL = "m"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def serving(tok, budget: RequestBudget, vocab: int = 32000) -> tuple[OpenAIServing, list]:
    started = []

    async def outputs(prompts, params, group):  # records what would reach an attention replica
        started.extend((ids, sp, group) for ids, sp in zip(prompts, params))
        raise APIError(503, "no engine in this test")

    return OpenAIServing(tok, ModelLimits(MODEL, vocab, 4096, 16, budget), outputs), started


def refusal(coro) -> APIError:
    with pytest.raises(APIError) as e:
        asyncio.run(coro)
    return e.value


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","prompt":"' + b'\\"' * (1 << 19),  # unterminated string of escapes: was quadratic
        b'{"a":' + b"[" * (1 << 20),
        b'{"a":' + b"[1," * 300_000 + b"1]",
        b'{"a":' + b"1" * 1_000_000 + b"}",
    ],
)
def test_pathological_bodies_are_refused(body):
    with pytest.raises(APIError) as e:
        parse_json(body)
    assert e.value.status == 400


def test_depth_surrogates_and_wide_bodies():
    ok = b'{"a":' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert parse_json(ok)
    with pytest.raises(APIError, match="deeper"):
        parse_json(b'{"a":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}")
    with pytest.raises(APIError) as e:
        parse_json(b'{"messages":[{"content":["x","\\ud800"]}]}')
    assert e.value.param == "messages" and "messages[0].content[1]" in e.value.message
    wide = b'{"prompt":[' + b",".join([b"1"] * 400_000) + b"]}"
    assert len(parse_json(wide)["prompt"]) == 400_000


def test_choices_times_tokens_over_the_budget_is_a_400_naming_the_limit(tok):
    s, started = serving(tok, RequestBudget(output_tokens=1000, prompt_tokens=10**6, layers=2, top_k=2))
    req = validate(CompletionRequest, {"model": MODEL, "prompt": "hi", "n": 8, "max_tokens": 126})
    e = refusal(s.completions(req))
    assert e.status == 400 and "server.max_request_output_tokens" in e.message and e.param == "max_tokens"
    assert started == []  # refused before anything reached an engine
    req = validate(ChatRequest, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 9})
    assert "max_request_output_tokens" not in refusal(s.chat(req)).message  # 9 x 16 default tokens fit


def test_prompt_times_choices_over_the_budget_is_a_400(tok):
    s, started = serving(tok, RequestBudget(output_tokens=10**6, prompt_tokens=500))
    prompt = list(range(3, 103))  # 100 tokens
    e = refusal(s.completions(validate(CompletionRequest, {"model": MODEL, "prompt": prompt, "n": 6})))
    assert e.status == 400 and "server.max_request_prompt_tokens" in e.message and started == []
    e = refusal(s.completions(validate(CompletionRequest, {"model": MODEL, "prompt": [prompt] * 3, "n": 2})))
    assert "server.max_request_prompt_tokens" in e.message


def test_routed_experts_over_the_budget_is_a_400_and_prompt_routes_are_asked_once(tok):
    s, started = serving(tok, RequestBudget(routed_experts=4 * 2 * 100, layers=4, top_k=2))
    prompt = list(range(3, 53))  # 50 tokens: 400 ids of prompt routes
    body = {"model": MODEL, "prompt": prompt, "n": 4, "max_tokens": 10, "return_prompt_routed_experts": True}
    refusal(s.completions(validate(CompletionRequest, body)))  # within: the engine is asked (and is absent)
    assert [sp.return_prompt_routed_experts for _, sp, _ in started] == [True, False, False, False]
    assert len({g for _, _, g in started}) == 1  # the choices share one group (their fair share)
    e = refusal(s.completions(validate(CompletionRequest, body | {"return_routed_experts": True, "max_tokens": 20})))
    assert e.status == 400 and "server.max_routed_experts" in e.message and e.param == "return_routed_experts"


def test_stop_strings_are_bounded():
    long = "x" * 1025
    for stop in (long, ["a", long]):
        with pytest.raises(APIError) as e:
            validate(CompletionRequest, {"model": MODEL, "prompt": "a", "stop": stop})
        assert e.value.param == "stop"


def test_detokenize_refuses_ids_the_tokenizer_does_not_have(tok):
    s, _ = serving(tok, RequestBudget(), vocab=tok.vocab_size + 64)  # a padded vocabulary
    from cluster.api.protocol import Detokenize

    e = refusal(s.detokenize(Detokenize(tokens=[1, tok.vocab_size + 3])))
    assert e.status == 400 and e.param == "tokens"
    assert asyncio.run(s.detokenize(Detokenize(tokens=[1, 1044])))["prompt"] == tok.decode([1, 1044])


def test_the_detokeniser_window_stays_bounded_on_bytes_that_never_form_a_character(tok):
    lead = tok.sp.vocab().index("<0xE2>")  # a 3-byte character's lead byte, forever incomplete
    d = IncrementalDetokenizer(tok, [1])
    text = ""
    for _ in range(2000):
        text += d.add([lead])
        assert len(d.ids) - d.prefix <= MAX_HELD_TOKENS + 4  # each step decodes a few tokens, not the tail
    text += d.flush()
    assert text == tok.decode([lead] * 2000)
    assert len(text) > 1900  # emitted as it went (replacement characters), not all at the end


def test_stats_of_several_attention_replicas_are_summed():
    a = AttentionStats(
        running=2,
        waiting=1,
        preemptions=3,
        expert_calls=10,
        expert_call_seconds=0.5,
        kv_usage=0.2,
        routed_tokens=[[0, 1, 5], [1, 0, 2]],
        expert_in_flight_tokens={1: 3},
        pid=7,
    )
    b = dataclasses.replace(a, running=5, kv_usage=0.4, routed_tokens=[[0, 1, 7]], expert_in_flight_tokens={1: 1, 2: 2})
    s = AttentionStats.summed([a, b])
    assert s.running == 7 and s.preemptions == 6 and s.waiting == 2 and abs(s.kv_usage - 0.3) < 1e-9
    assert s.routed_tokens == [[0, 1, 12], [1, 0, 2]] and s.expert_in_flight_tokens == {1: 4, 2: 2}
    assert s.pid == 0 and a.expert_in_flight_tokens == {1: 3}  # no one process's; the reports unchanged


def test_merging_every_output_at_once_equals_merging_one_by_one():
    from router.engine import RequestOutput

    merge_all = RequestOutput.joined

    outs = [
        RequestOutput("r", [i], f"t{i}", i == 4, "length" if i == 4 else None, 3, i + 1, [(i, -0.5, [(i, -0.5)])])
        for i in range(5)
    ]
    outs[0].prompt_routed_experts = [[[0, 1]]]
    outs[2].routed_experts = [[[1, 0]]]
    step = outs[0]
    for o in outs[1:]:
        step = step.merge(o)
    assert merge_all(outs) == step
    assert merge_all(outs[:1]) == outs[0]


def test_the_stall_guard_ends_a_stream_whose_writes_stop_coming_back_and_only_then():
    """StallGuard (cluster/api/serving.py): the wait for the engine between chunks never counts; a
    consumer whose write has not come back for timeout_s gets the body closed (its finally runs:
    the request's choices aborted), the stall reported once, and the stream ends."""
    from cluster.api.serving import StallGuard

    async def run(write_s: list[float], engine_s: float, timeout_s: float):
        closed, stalls, got = [], [], []

        async def body():
            try:
                for i in range(len(write_s)):
                    await asyncio.sleep(engine_s)
                    yield i
            finally:
                closed.append(True)

        guard = StallGuard(body(), timeout_s, lambda: stalls.append(True))
        async for chunk in guard:
            got.append(chunk)
            await asyncio.sleep(write_s[chunk])  # the consumer's write of this chunk
        await asyncio.sleep(0)
        return got, closed, stalls

    # a slow engine (0.15 s between chunks, the guard at 0.1 s) and quick writes: every chunk arrives
    got, closed, stalls = asyncio.run(run([0.0] * 5, 0.15, 0.1))
    assert got == [0, 1, 2, 3, 4] and closed == [True] and stalls == []
    # the third write stalls for 0.3 s: the body is closed then, and the stream ends after that write
    got, closed, stalls = asyncio.run(run([0.0, 0.0, 0.3, 0.0, 0.0], 0.0, 0.1))
    assert got == [0, 1, 2] and closed == [True] and stalls == [True]


def test_a_stall_guard_whose_consumer_is_gone_reports_nothing():
    """A client that disconnects mid-write drops the response and its guard: the pending timer
    neither counts a stall nor touches the body."""
    import gc

    from cluster.api.serving import StallGuard

    async def main():
        stalls = []

        async def body():
            yield b"x"
            yield b"y"

        guard = StallGuard(body(), 0.05, lambda: stalls.append(True))
        assert await guard.__anext__() == b"x"  # the timer runs from here
        del guard
        gc.collect()
        await asyncio.sleep(0.15)
        return stalls

    assert asyncio.run(main()) == []
