"""The OpenAI serving logic (cluster/api/serving.py) against the in-process engine, with no HTTP and no
Serve: request bodies in, response bodies and SSE lines out, compared with what the engine itself
generates for the same token ids. (Through Serve and HTTP: tests/integration/test_openai.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from cluster.api.protocol import APIError, ChatRequest, CompletionRequest, ModelLimits, RequestBudget, validate
from cluster.api.serving import OpenAIServing
from cluster.build import local_engine
from cluster.config import ServerConfig
from model.sampling import SamplingParams

MODEL = "tiny"


def engine_outputs(eng):
    """The `outputs` of OpenAIServing driven by an engine in this process, as the attention worker
    does it: every choice of the request added at once, a later choice of a prompt forked from its
    first, one batch of (choice, output) per engine step."""

    async def outputs(prompts, params, group):
        rids: list[str] = []
        for k, (p, sp) in enumerate(zip(prompts, params)):
            first = prompts.index(p)
            rids.append(eng.add_request(p, sp, group=group, fork_of=rids[first] if first < k else None))
        choice = {r: k for k, r in enumerate(rids)}

        async def batches():
            while eng.has_unfinished():
                batch = [(choice[o.req_id], o) for o in eng.step() if o.req_id in choice]
                if batch:
                    yield batch

        return batches()

    return outputs


@pytest.fixture(scope="module")
def eng(tiny_dir):
    return local_engine(tiny_dir, "float32")


@pytest.fixture(scope="module")
def serving(eng):
    mc = eng.dense.cfg
    budget = RequestBudget.of(ServerConfig(), mc.num_hidden_layers, mc.num_experts_per_tok)
    return OpenAIServing(
        eng.tokenizer, ModelLimits(MODEL, mc.vocab_size, eng.max_model_len, 16, budget), engine_outputs(eng)
    )


def run(coro):
    return asyncio.run(coro)


def complete(serving, **body):
    return run(serving.completions(validate(CompletionRequest, {"model": MODEL, **body})))


def stream(serving, route: str, **body) -> list:
    """The SSE events of a streamed request: parsed JSON, then the closing "[DONE]"."""

    async def read():
        schema = ChatRequest if route == "chat" else CompletionRequest
        req = validate(schema, {"model": MODEL, "stream": True, **body})
        lines = await (serving.chat(req) if route == "chat" else serving.completions(req))
        return [line async for line in lines]

    events = []
    for line in run(read()):
        assert line.startswith("data: ") and line.endswith("\n\n"), line
        data = line[len("data: ") : -2]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def greedy(eng, ids, **kw):
    return eng.generate([ids], SamplingParams(temperature=0.0, **kw))[0]


def test_a_completion_is_the_engines_generation(serving, eng):
    prompt = "The capital of France is"
    body = complete(serving, prompt=prompt, max_tokens=9, temperature=0)
    want = greedy(eng, eng.tokenizer.encode(prompt), max_tokens=9)
    (c,) = body["choices"]
    assert (c["index"], c["text"], c["finish_reason"]) == (0, want.text, want.finish_reason)
    assert body["object"] == "text_completion" and body["model"] == MODEL
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert body["usage"] == {
        "prompt_tokens": want.prompt_tokens,
        "completion_tokens": want.completion_tokens,
        "total_tokens": want.prompt_tokens + want.completion_tokens,
    }
    assert 0 <= cached < want.prompt_tokens


def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(serving):
    prompt = "A prompt sent twice, long enough to fill more than one block of sixteen tokens: " * 2
    first = complete(serving, prompt=prompt, max_tokens=2, temperature=0, cache_salt="usage-test")
    again = complete(serving, prompt=prompt, max_tokens=2, temperature=0, n=3, cache_salt="usage-test")
    n = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a salt nobody used before
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n // 16 * 16 - (n % 16 == 0)  # once, not n times
    assert [c["text"] for c in again["choices"]] == [first["choices"][0]["text"]] * 3
    events = stream(
        serving,
        "completions",
        prompt=prompt,
        max_tokens=2,
        temperature=0,
        cache_salt="usage-test",
        stream_options={"include_usage": True},
    )
    assert events[-2]["usage"] == again["usage"] | {"completion_tokens": 2, "total_tokens": n + 2}


def test_the_stream_adds_up_to_the_response_and_ends_with_usage_then_done(serving):
    kw = dict(prompt="Once upon a time", max_tokens=12, temperature=0)
    whole = complete(serving, **kw)
    events = stream(serving, "completions", stream_options={"include_usage": True}, **kw)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_prompts_times_n_are_choices_in_order(serving, eng):
    prompts = ["Hello there", "A long way from home"]
    body = complete(serving, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        want = greedy(eng, eng.tokenizer.encode(p), max_tokens=6).text
        assert body["choices"][2 * i]["text"] == body["choices"][2 * i + 1]["text"] == want
    assert body["usage"]["completion_tokens"] == 4 * 6


def test_token_id_prompts_echo_and_logprobs(serving, eng):
    ids = eng.tokenizer.encode("Numbers: one two")
    body = complete(serving, prompt=ids, max_tokens=5, temperature=0, logprobs=2)
    (c,) = body["choices"]
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(len(top) <= 2 and x <= 0 for top, x in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert "".join(lp["tokens"]) == c["text"] == greedy(eng, ids, max_tokens=5).text
    echoed = complete(serving, prompt="Numbers: one two", max_tokens=5, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == "Numbers: one two" + c["text"]


def test_a_stop_string_cuts_the_text_and_is_named(serving, eng):
    want = greedy(eng, eng.tokenizer.encode("The sky"), max_tokens=16, ignore_eos=True).text
    stop = want[len(want) // 2 : len(want) // 2 + 2]
    assert stop.strip(), want
    (c,) = complete(serving, prompt="The sky", max_tokens=16, temperature=0, stop=[stop], ignore_eos=True)["choices"]
    assert (c["text"], c["finish_reason"], c["stop_reason"]) == (want[: want.find(stop)], "stop", stop)


def test_chat_is_the_chat_template_then_generation(serving, eng):
    msgs = [{"role": "user", "content": "Name a colour."}]
    req = validate(ChatRequest, {"model": MODEL, "messages": msgs, "max_tokens": 7, "temperature": 0})
    body = run(serving.chat(req))
    want = greedy(eng, eng.tokenizer.encode_chat(msgs), max_tokens=7)
    (c,) = body["choices"]
    assert c["message"] == {"role": "assistant", "content": want.text} and body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens
    events = stream(serving, "chat", messages=msgs, max_tokens=7, temperature=0)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == want.text


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "model": "other"}, "model"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "max_tokens": 1 << 20}, "max_tokens"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "n": 200}, "n"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
    ],
)
def test_bad_requests_are_refused_before_the_engine_and_name_the_field(serving, eng, body, param):
    with pytest.raises(APIError) as e:
        complete(serving, **{"model": MODEL, **body})
    assert e.value.status in (400, 404) and e.value.param == param, (e.value.status, e.value.param, str(e.value))
    assert not eng.has_unfinished()  # nothing reached the engine


# ---------------------------------------------------------------- prompt logprobs (lm-eval's loglikelihood)


def reference_logprobs(tiny_dir, ids: list[int]) -> torch.Tensor:
    """log_softmax of the whole model's logits in one process (model/, which equals transformers)."""
    from model.model import Transformer

    return torch.log_softmax(Transformer.from_pretrained(tiny_dir, "float32").logits(ids), dim=-1)


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(serving, eng, tiny_dir):
    """lm-eval's local-completions: token ids of context + continuation, echo, logprobs=1, max_tokens=1;
    the continuation's loglikelihood is the sum of token_logprobs[ctxlen:-1], greedy if each top token
    is the continuation's."""
    ctx, cont = eng.tokenizer.encode("The answer to the question is"), eng.tokenizer.encode(" four", bos=False)
    ids = ctx + cont
    body = complete(serving, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = reference_logprobs(tiny_dir, ids)
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1 : len(ids)]), torch.tensor(want), atol=1e-4, rtol=0)
    got_ll = sum(lp["token_logprobs"][len(ctx) : -1])
    assert abs(got_ll - sum(want[len(ctx) - 1 :])) < 1e-3
    for i, top in enumerate(lp["top_logprobs"][1 : len(ids)], start=1):  # the model's most likely next token
        (piece, value), best = next(iter(top.items())), int(ref[i - 1].argmax())
        assert piece == eng.tokenizer.piece(best) and abs(value - ref[i - 1, best].item()) < 1e-4
    assert body["usage"]["completion_tokens"] == 1 and body["choices"][0]["text"].startswith(eng.tokenizer.decode(ids))


def test_max_tokens_zero_with_echo_is_the_prompt_alone(serving, eng):
    body = complete(serving, prompt="Hi there", max_tokens=0, echo=True, logprobs=0, n=2)
    for c in body["choices"]:
        assert (c["text"], c["finish_reason"]) == ("Hi there", "length")
        assert len(c["logprobs"]["tokens"]) == len(eng.tokenizer.encode("Hi there"))
    assert body["choices"][0]["logprobs"] == body["choices"][1]["logprobs"]  # computed once, for both
    assert body["usage"]["completion_tokens"] == 0
    with pytest.raises(APIError) as e:
        complete(serving, prompt="Hi", max_tokens=0)
    assert e.value.param == "max_tokens"


def test_the_streamed_echo_carries_the_same_prompt_logprobs(serving):
    kw = dict(prompt="Once upon a time", max_tokens=4, echo=True, logprobs=2, temperature=0)
    whole = complete(serving, **kw)["choices"][0]
    chunks = [e["choices"][0] for e in stream(serving, "completions", **kw)[:-1] if e["choices"]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert [x for c in chunks for x in c["logprobs"][key]] == whole["logprobs"][key], key


def test_vllms_prompt_logprobs_on_both_routes(serving, eng, tiny_dir):
    ids = eng.tokenizer.encode("A short prompt")
    (c,) = complete(serving, prompt=ids, max_tokens=2, prompt_logprobs=2, temperature=0)["choices"]
    plp = c["prompt_logprobs"]
    ref = reference_logprobs(tiny_dir, ids)
    assert len(plp) == len(ids) and plp[0] is None
    for i, entry in enumerate(plp[1:], start=1):
        mine = entry[str(ids[i])]
        rank = int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
        assert abs(mine["logprob"] - ref[i - 1, ids[i]].item()) < 1e-4 and mine["rank"] == rank
        assert 1 <= len(entry) <= 3 and any(v["rank"] == 1 for v in entry.values())
    msgs = [{"role": "user", "content": "Hello"}]
    req = validate(ChatRequest, {"model": MODEL, "messages": msgs, "max_tokens": 2, "prompt_logprobs": 0})
    body = run(serving.chat(req))
    assert len(body["prompt_logprobs"]) == len(eng.tokenizer.encode_chat(msgs)) and body["prompt_logprobs"][0] is None
    with pytest.raises(APIError) as e:
        stream(serving, "chat", messages=msgs, prompt_logprobs=1)
    assert e.value.param == "prompt_logprobs"
