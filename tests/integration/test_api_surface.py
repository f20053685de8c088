"""The request surface as vLLM's server speaks it, through real Serve HTTP and gRPC with the official
`openai` client: every parameter is accepted, has its effect, stays independent of the company its
request keeps, and a bad value gets a 400 in the OpenAI shape that names it."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import openai
import pytest

from cluster.build import local_engine
from cluster.config import load_config
from model.sampling import SamplingParams
from tests.support import post, running_sequences, serve_app

pytestmark = pytest.mark.ray
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
M = "tiny-api"
REPEATS = "Un deux trois " * 12  # the tiny model repeats itself after this prompt: penalties show


@pytest.fixture(scope="module")
def server(grpc_port, tiny_dir):
    cfg = load_config(
        CONFIG,
        {
            "model": tiny_dir,
            "dtype": "float32",
            "server.served_model_name": M,
            "engine.max_model_len": 256,
            "server.metrics_refresh_s": 0,
        },
    )
    with serve_app(cfg, "mixserve", grpc_port) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_dir):
    return local_engine(tiny_dir, "float32")


def solo(local, prompt: str | list[int], **sp) -> tuple[str, list[int], str]:
    ids = local.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    o = local.generate([ids], SamplingParams(**sp))[0]
    return o.text, o.new_token_ids, o.finish_reason


def stream_texts(chunks) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (
                getattr(ch, "text", None) or (ch.delta.content if hasattr(ch, "delta") else "") or ""
            )
    return texts


# ---------------------------------------------------------------- n and prompt lists


def test_n_choices_are_each_their_own_seeded_sequence(client, local):
    kw = dict(model=M, prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=11)
    r = client.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    solos = [solo(local, "Once upon a time", max_tokens=10, temperature=1.0, seed=11 + j) for j in range(3)]
    want = [s[0] for s in solos]
    assert [c.text for c in r.choices] == want
    assert len(set(want)) > 1  # different seeds, different samples
    assert r.usage.prompt_tokens == len(local.tokenizer.encode("Once upon a time"))  # counted once
    assert r.usage.completion_tokens == sum(len(s[1]) for s in solos)
    again = client.completions.create(n=3, **kw)
    assert [c.text for c in again.choices] == want  # reproducible
    chunks = list(client.completions.create(n=3, stream=True, **kw))
    assert stream_texts(chunks) == dict(enumerate(want))
    finals = [ch for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(ch.index for ch in finals) == [0, 1, 2]


def test_chat_n_streams_and_non_streams_alike(client, local):
    msgs = [{"role": "user", "content": "Pick a number."}]
    ids = local.tokenizer.encode_chat(msgs)
    want = [solo(local, ids, max_tokens=8, temperature=0.9, seed=3 + j)[0] for j in range(2)]
    r = client.chat.completions.create(model=M, messages=msgs, n=2, max_tokens=8, temperature=0.9, seed=3)
    assert [c.message.content for c in r.choices] == want
    chunks = list(
        client.chat.completions.create(model=M, messages=msgs, n=2, max_tokens=8, temperature=0.9, seed=3, stream=True)
    )
    assert stream_texts(chunks) == dict(enumerate(want))
    roles = [ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"]
    assert sorted(roles) == [0, 1]


def test_prompt_lists_number_choices_as_openai_does(client, local):
    prompts = ["The sky is", "Numbers: 1 2 3"]
    want = [solo(local, p, max_tokens=6, temperature=0)[0] for p in prompts]
    r = client.completions.create(model=M, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [(c.index, c.text) for c in r.choices] == [(0, want[0]), (1, want[0]), (2, want[1]), (3, want[1])]
    ids = [local.tokenizer.encode(p) for p in prompts]
    r = client.completions.create(model=M, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == want
    assert r.usage.prompt_tokens == sum(map(len, ids))
    r = client.completions.create(model=M, prompt=ids[1], max_tokens=6, temperature=0)
    assert r.choices[0].text == want[1]
    chunks = list(client.completions.create(model=M, prompt=prompts, max_tokens=6, temperature=0, stream=True))
    assert stream_texts(chunks) == dict(enumerate(want))


# ---------------------------------------------------------------- sampling parameters


SAMPLING = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=1.0),
    dict(repetition_penalty=1.8),
    dict(presence_penalty=-1.0, frequency_penalty=0.5, temperature=0.8, seed=4, min_p=0.05, top_k=40),
    dict(logit_bias={"13": 100}),
    dict(min_tokens=12, stop=["trois"]),
    dict(top_p=0.5, temperature=1.3, seed=9),
]


def test_each_sampling_parameter_equals_the_engine_and_is_batch_independent(client, local):
    """All variants at once (one batch on the server), each equal to the in-process engine alone."""
    want, got = [], [None] * len(SAMPLING)
    for extra in SAMPLING:
        sp = {"max_tokens": 12, "temperature": 0, "ignore_eos": True} | extra
        if "logit_bias" in sp:
            sp["logit_bias"] = {int(k): float(v) for k, v in sp["logit_bias"].items()}
        want.append(solo(local, REPEATS, **sp)[0])

    def one(i):
        sp = {"temperature": 0} | SAMPLING[i]
        body = {k: sp.pop(k) for k in ("min_p", "top_k", "repetition_penalty", "min_tokens") if k in sp}
        got[i] = (
            client.completions.create(
                model=M, prompt=REPEATS, max_tokens=12, extra_body=body | {"ignore_eos": True}, **sp
            )
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(SAMPLING))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
    plain = solo(local, REPEATS, max_tokens=12, temperature=0, ignore_eos=True)[0]
    for i in range(3):
        assert got[i] != plain, SAMPLING[i]  # each penalty breaks the repetition
    assert (
        got[4]
        == local.tokenizer.decode(local.tokenizer.encode(REPEATS) + [13] * 12)[
            len(local.tokenizer.decode(local.tokenizer.encode(REPEATS))) :
        ]
    )


def test_stop_extensions(client, local):
    full, toks, _ = solo(local, "Hello there", max_tokens=12, temperature=0, ignore_eos=True)
    stop = full[4:7]
    r = client.completions.create(
        model=M,
        prompt="Hello there",
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True, "ignore_eos": True},
    )
    c = r.choices[0]
    assert c.text == full[: full.find(stop) + len(stop)] and c.finish_reason == "stop"
    assert c.model_extra["stop_reason"] == stop
    r = client.completions.create(
        model=M, prompt="Hello there", max_tokens=12, temperature=0, extra_body={"stop_token_ids": [toks[2]]}
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].model_extra["stop_reason"] == toks[2]
    eos = local.tokenizer.eos_id
    r = client.completions.create(
        model=M,
        prompt="Hello there",
        max_tokens=3,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert r.choices[0].text == "</s>" * 3
    r = client.completions.create(
        model=M,
        prompt="Hello there",
        max_tokens=3,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 2},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"  # EOS only once min_tokens are out


def test_echo(client, local):
    want = solo(local, "Echo this", max_tokens=5, temperature=0)[0]
    r = client.completions.create(model=M, prompt="Echo this", max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == "Echo this" + want
    chunks = list(
        client.completions.create(model=M, prompt="Echo this", max_tokens=5, temperature=0, echo=True, stream=True)
    )
    assert stream_texts(chunks)[0] == "Echo this" + want
    ids = local.tokenizer.encode("Echo this")
    r = client.completions.create(model=M, prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == local.tokenizer.decode(ids) + want


def test_echo_with_logprobs_scores_the_prompt_through_http(client, local):
    """What lm-evaluation-harness's local-completions sends for a loglikelihood task, through Serve: the
    prompt tokens' logprobs (the first null) equal the in-process engine's, then the generated one's."""
    ids = local.tokenizer.encode("Score this prompt, please")
    r = client.completions.create(model=M, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    want = local.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([w[1] for w in want.prompt_logprobs[1:]], abs=1e-5)
    alone = client.completions.create(model=M, prompt="Hi", max_tokens=0, echo=True, logprobs=0)
    assert alone.choices[0].text == "Hi" and alone.usage.completion_tokens == 0
    vllm = client.completions.create(
        model=M, prompt=ids, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 0}
    )
    plp = vllm.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and [e[str(t)]["logprob"] for e, t in zip(plp[1:], ids[1:])] == pytest.approx(
        [w[1] for w in want.prompt_logprobs[1:]], abs=1e-5
    )


# ---------------------------------------------------------------- the rest of the surface


def test_usage_is_a_final_chunk_with_no_choices(client):
    chunks = list(
        client.chat.completions.create(
            model=M,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            n=2,
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(
        client.completions.create(
            model=M,
            prompt="Hi",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    plain = list(client.completions.create(model=M, prompt="Hi", max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices


def test_chat_content_parts_token_limits_user_and_response_format(client, local):
    text = [{"role": "user", "content": "Name a color."}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "color."}]}]
    want = solo(local, local.tokenizer.encode_chat(text), max_tokens=6, temperature=0)[0]
    for msgs in (text, parts):
        for limit in ({"max_tokens": 6}, {"max_completion_tokens": 6}):
            r = client.chat.completions.create(
                model=M, messages=msgs, temperature=0, user="u-1", response_format={"type": "text"}, **limit
            )
            assert r.choices[0].message.content == want
    dev = client.chat.completions.create(
        model=M, messages=[{"role": "developer", "content": "Be brief."}] + text, max_tokens=2, temperature=0
    )
    assert dev.usage.prompt_tokens > len(local.tokenizer.encode_chat(text))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=M,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )
    assert e.value.body["param"] == "messages" and "text" in e.value.body["message"]


def test_structured_outputs_through_the_openai_client(client):
    """The client's own structured-output helper (a pydantic model as a strict json_schema), json_object,
    and vLLM's structured_outputs on a stream: the random-weight model's answers always parse."""
    from typing import Literal

    import pydantic

    class Answer(pydantic.BaseModel):
        colour: Literal["red", "green", "dark blue"]
        ok: bool
        n: int = pydantic.Field(ge=0, le=99)

    msgs = [{"role": "user", "content": "Answer in JSON."}]
    r = client.chat.completions.parse(model=M, messages=msgs, response_format=Answer, max_tokens=64, n=3, seed=2)
    assert all(isinstance(c.message.parsed, Answer) and c.finish_reason == "stop" for c in r.choices)
    r = client.chat.completions.create(
        model=M, messages=msgs, response_format={"type": "json_object"}, max_tokens=48, n=4, seed=1
    )
    assert all(c.message.content.startswith("{") for c in r.choices)
    assert all(isinstance(json.loads(c.message.content), dict) for c in r.choices if c.finish_reason == "stop")
    s = client.completions.create(
        model=M,
        prompt="Date:",
        max_tokens=32,
        stream=True,
        extra_body={"structured_outputs": {"regex": "20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"}},
    )
    chunks = list(s)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(text) == 10 and text[:2] == "20" and chunks[-1].choices[0].finish_reason == "stop", text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=M, messages=msgs, extra_body={"structured_outputs": {"regex": "[unclosed"}}, max_tokens=4
        )
    assert e.value.body["param"] == "structured_outputs" and "regex" in e.value.body["message"]


def test_tokenize_and_detokenize(server, local):
    code, _, r = post(server + "/tokenize", json.dumps({"model": M, "prompt": "Résumé naïve"}).encode())
    ids = local.tokenizer.encode("Résumé naïve")
    assert code == 200 and r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == 256
    code, _, r = post(
        server + "/tokenize",
        json.dumps({"prompt": "x", "add_special_tokens": False, "return_token_strs": True}).encode(),
    )
    assert r["tokens"] == local.tokenizer.encode("x", bos=False) and len(r["token_strs"]) == r["count"]
    msgs = [{"role": "user", "content": "Hi"}]
    code, _, r = post(server + "/tokenize", json.dumps({"messages": msgs}).encode())
    assert r["tokens"] == local.tokenizer.encode_chat(msgs)
    code, _, r = post(server + "/detokenize", json.dumps({"model": M, "tokens": ids}).encode())
    assert code == 200 and r["prompt"] == "Résumé naïve"
    for route, body, param in [
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
        ("/tokenize", {"prompt": "x", "bogus": 1}, "bogus"),
    ]:
        code, _, err = post(server + route, json.dumps(body).encode())
        assert code in (400, 404) and err["error"]["param"] == param, (route, body, err)


BAD_VALUES = [
    ("presence_penalty", 2.5),
    ("presence_penalty", "x"),
    ("frequency_penalty", -2.01),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1),
    ("min_p", 1.5),
    ("min_p", -0.1),
    ("min_tokens", -1),
    ("min_tokens", 50),
    ("logit_bias", {"5": 101}),
    ("logit_bias", {"abc": 1}),
    ("logit_bias", {"-1": 1}),
    ("logit_bias", {"99999": 1}),
    ("logit_bias", [1, 2]),
    ("n", 0),
    ("n", 129),
    ("n", 1.5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [10**6]),
    ("skip_special_tokens", "maybe"),
    ("include_stop_str_in_output", 3),
    ("echo", "often"),
    ("best_of", 3),
    ("suffix", "tail"),
    ("stream_options", {"include_usage": True, "x": 1}),
    ("user", 5),
    ("prompt", []),
    ("prompt", [[]]),
    ("prompt", [[1, -1]]),
    ("prompt", [1, "a"]),
    ("prompt", ["ok", 3]),
    ("top_k", -2),
    ("seed", 2**64),
    ("logprobs", 21),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}"[:40] for f, v in BAD_VALUES])
def test_bad_values_get_a_400_naming_the_parameter(server, field, value):
    body = {"model": M, "prompt": "x", "max_tokens": 20, field: value}
    code, _, err = post(server + "/v1/completions", json.dumps(body).encode())
    assert code == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == field and field in err["error"]["message"], err


@pytest.mark.parametrize(
    "field,value",
    [
        ("presence_penalty", 3),
        ("repetition_penalty", 0),
        ("logit_bias", {"1": -101}),
        ("n", 200),
        ("max_completion_tokens", 0),
        ("response_format", {"type": "xml"}),
        ("top_logprobs", 30),
        ("min_tokens", 10**3),
    ],
)
def test_bad_chat_values_name_the_parameter(server, field, value):
    body = {"model": M, "messages": [{"role": "user", "content": "x"}], field: value}
    code, _, err = post(server + "/v1/chat/completions", json.dumps(body).encode())
    assert code == 400 and err["error"]["param"] == field, err


def test_a_bad_request_leaves_running_streams_alone(client, local):
    want = solo(local, "Keep going", max_tokens=40, temperature=0, ignore_eos=True)[0]
    got = []

    def stream():
        s = client.completions.create(
            model=M, prompt="Keep going", max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        got.append("".join(c.choices[0].text for c in s))

    th = threading.Thread(target=stream)
    th.start()
    for field, value in BAD_VALUES:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=M, prompt="x", max_tokens=20, extra_body={field: value})
    th.join(timeout=120)
    assert got == [want]


# ---------------------------------------------------------------- gRPC


def test_grpc_takes_the_same_sampling_fields(grpc_port, server, local):
    import grpc

    from cluster.proto import mixserve_pb2 as pb
    from cluster.proto.mixserve_pb2_grpc import MixServeStub

    full, toks, _ = solo(local, REPEATS, max_tokens=10, temperature=0, ignore_eos=True)
    want = solo(
        local,
        REPEATS,
        max_tokens=10,
        temperature=0,
        ignore_eos=True,
        repetition_penalty=1.8,
        logit_bias={toks[0]: -100.0},
    )
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = MixServeStub(ch)
        r = stub.Generate(
            pb.GenerateRequest(
                prompt=REPEATS,
                max_tokens=10,
                temperature=0,
                ignore_eos=True,
                repetition_penalty=1.8,
                logit_bias={toks[0]: -100.0},
            ),
            timeout=60,
        )
        assert (r.text, list(r.token_ids)) == want[:2]
        r = stub.Generate(
            pb.GenerateRequest(prompt=REPEATS, max_tokens=10, temperature=0, stop_token_ids=[toks[1]]), timeout=60
        )
        assert list(r.token_ids) == toks[:2] and r.stop_token_id == toks[1]
        r = stub.Generate(
            pb.GenerateRequest(
                prompt=REPEATS, max_tokens=10, temperature=0, stop_token_ids=[toks[1]], min_tokens=4, ignore_eos=True
            ),
            timeout=60,
        )
        assert len(r.token_ids) >= 4
        for bad in (dict(repetition_penalty=0), dict(presence_penalty=9), dict(min_p=2), dict(logit_bias={1: 500})):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(pb.GenerateRequest(prompt="x", **bad), timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and next(iter(bad)) in e.value.details()


def test_grpc_reports_and_controls_prefix_caching(grpc_port, server):
    """cached_tokens as HTTP's usage reports them; cache_salt and skip_reading_prefix_cache as over HTTP."""
    import grpc

    from cluster.proto import mixserve_pb2 as pb
    from cluster.proto.mixserve_pb2_grpc import MixServeStub

    prompt = list(range(10, 90))  # 80 tokens: 5 full blocks of 16
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = MixServeStub(ch)

        def gen(**kw):
            return stub.Generate(
                pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=2, temperature=0, **kw), timeout=60
            )

        first = gen(cache_salt="grpc-test")
        again = gen(cache_salt="grpc-test")
        assert first.cached_tokens == 0 and again.cached_tokens >= 64
        assert list(again.token_ids) == list(first.token_ids)
        assert gen(cache_salt="grpc-other").cached_tokens == 0  # another salt: nothing shared
        assert gen(cache_salt="grpc-test", skip_reading_prefix_cache=True).cached_tokens == 0
        streamed = list(
            stub.GenerateStream(
                pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=3, temperature=0, cache_salt="grpc-test"),
                timeout=60,
            )
        )
        assert streamed[0].cached_tokens == streamed[-1].cached_tokens == again.cached_tokens
        with pytest.raises(grpc.RpcError) as e:
            gen(cache_salt="a/b")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in e.value.details()


# ---------------------------------------------------------------- vLLM's own benchmark client


def test_vllm_bench_client_runs_against_the_server(server, tiny_dir):
    """vLLM's `bench serve` sends what vLLM's server accepts (repetition_penalty, ignore_eos, ...):
    every request completes. Needs vLLM in its own environment (MIXSERVE_VLLM_PYTHON)."""
    py = os.environ.get("MIXSERVE_VLLM_PYTHON")
    if not py or not Path(py).exists():
        pytest.skip("vLLM's client is optional: set MIXSERVE_VLLM_PYTHON to the python of an environment with vllm")
    from benchmarks.bench import VLLM_CLIENT

    out = tempfile.mkdtemp()
    cmd = [
        py,
        "-c",
        VLLM_CLIENT,
        "--backend",
        "openai",
        "--base-url",
        server,
        "--endpoint",
        "/v1/completions",
        "--model",
        M,
        "--tokenizer",
        tiny_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        "16",
        "--random-output-len",
        "8",
        "--num-prompts",
        "8",
        "--max-concurrency",
        "4",
        "--ignore-eos",
        "--save-result",
        "--result-dir",
        out,
        "--result-filename",
        "r.json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads((Path(out) / "r.json").read_text())
    assert r["completed"] == 8 and r["total_output_tokens"] == 64, r.get("errors")


def test_a_client_gone_mid_stream_frees_every_choice(server, client):
    import time

    stream = client.completions.create(
        model=M,
        prompt=["Long story", "Another"],
        n=2,
        max_tokens=200,
        temperature=0.7,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    assert running_sequences(server) == 4
    stream.close()
    deadline = time.monotonic() + 5
    while running_sequences(server) != 0:
        assert time.monotonic() < deadline, "choices of an abandoned request are still running"
        time.sleep(0.2)


# ---------------------------------------------------------------- routed experts, dashboard, routing report


def test_routed_experts_per_token_opt_in_streamed_and_not(client, local):
    prompt = "Routing is"
    ids = local.tokenizer.encode(prompt)
    want = local.generate(
        [ids],
        SamplingParams(max_tokens=6, temperature=0, return_routed_experts=True, return_prompt_routed_experts=True),
    )[0]
    extra = {"return_routed_experts": True, "return_prompt_routed_experts": True}
    r = client.completions.create(model=M, prompt=prompt, max_tokens=6, temperature=0, extra_body=extra)
    c = r.choices[0].model_extra
    assert c["routed_experts"] == want.routed_experts and len(c["routed_experts"]) == r.usage.completion_tokens
    assert r.model_extra["prompt_routed_experts"] == want.prompt_routed_experts and len(
        want.prompt_routed_experts
    ) == len(ids)
    cfg = local.dense.cfg
    assert all(
        len(t) == cfg.num_hidden_layers
        and all(len(k) == cfg.num_experts_per_tok and all(0 <= e < cfg.num_local_experts for e in k) for k in t)
        for t in c["routed_experts"]
    )
    chunks = list(
        client.completions.create(model=M, prompt=prompt, max_tokens=6, temperature=0, stream=True, extra_body=extra)
    )
    streamed = [t for ch in chunks for x in ch.choices for t in (x.model_extra.get("routed_experts") or [])]
    assert streamed == want.routed_experts
    plain = client.completions.create(model=M, prompt=prompt, max_tokens=6, temperature=0)
    assert "routed_experts" not in plain.choices[0].model_extra  # off by default
    chat = client.chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        extra_body={"return_routed_experts": True},
    )
    assert len(chat.choices[0].model_extra["routed_experts"]) == chat.usage.completion_tokens


def test_dashboard_queries_name_metrics_the_server_exports(server, client):
    import re
    import urllib.request

    dash = json.loads(
        (Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "grafana-dashboard.json").read_text()
    )
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource"}
    for p in dash["panels"]:
        assert p["type"] in {"timeseries", "heatmap", "stat", "bargauge", "table"} and p["targets"], p["title"]
        assert set(p["gridPos"]) == {"x", "y", "w", "h"}
    client.completions.create(model=M, prompt="Traffic for the dashboard", max_tokens=8)

    def scrape() -> str:
        with urllib.request.urlopen(server + "/metrics", timeout=60) as r:
            return r.read().decode()

    names = {line.split("{")[0].split(" ")[0] for line in scrape().splitlines() if line and not line.startswith("#")}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bmixserve_[a-z_]+", e)}
    assert used and used <= names, used - names
    panels = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in (
        "layer x expert",
        "replicas",
        "time to first token",
        "inter-token",
        "round trip",
        "retries",
        "kv-cache",
        "waiting",
    ):
        assert topic in panels, topic


def test_routing_report_through_the_server(server, tmp_path):
    from benchmarks.routing import random_rates
    from cluster.cli import main

    a, b = tmp_path / "prose.txt", tmp_path / "code.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    b.write_text("def f(x):\n    return x + 1\n" * 12)
    out = tmp_path / "report"
    assert main(["routing", str(a), str(b), "--url", server, "--out", str(out), "--chunk-chars", "200"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["files"]) == {"prose.txt", "code.txt"} and rep["model"] == M
    assert (rep["random"]["keep_first"], rep["random"]["keep_any"]) == random_rates(rep["num_experts"], rep["top_k"])
    for r in rep["files"].values():
        assert r["tokens"] > 50
        for row in r["share"]:
            assert abs(sum(row) - 1) < 1e-9 and len(row) == rep["num_experts"]
        assert all(0 <= x <= 1 for x in r["keep_first"] + r["keep_any"])
        assert all(f <= y for f, y in zip(r["keep_first"], r["keep_any"]))
    for png in ("shares.png", "repetition.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "keep first" in (out / "report.md").read_text()
