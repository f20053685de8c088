"""The OpenAI API through a real Ray Serve HTTP proxy, driven by the official `openai` client."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from ray import serve

from cluster.build import local_engine
from cluster.config import load_config
from cluster.serve.app import build_app
from model.config import MixtralConfig
from model.sampling import SamplingParams
from tests.support import post, running_sequences, serve_app

pytestmark = pytest.mark.ray
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def server(grpc_port, tiny_dir):
    cfg = load_config(
        CONFIG,
        {
            "model": tiny_dir,
            "dtype": "float32",
            "server.served_model_name": "tiny-test",
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


def test_models(client, tiny_dir):
    (card,) = client.models.list().data
    assert card.id == "tiny-test" and card.object == "model"
    extra = card.model_extra  # vLLM's fields: root (the checkpoint its benchmark loads a tokenizer from), ...
    assert extra["root"] == tiny_dir and extra["parent"] is None and extra["max_model_len"] > 0
    (perm,) = extra["permission"]
    assert perm["object"] == "model_permission" and perm["allow_sampling"] and perm["allow_logprobs"]


def test_completion_equals_in_process_and_stream_equals_non_stream(client, local):
    prompt = "The meaning of life is"
    want = local.generate([local.tokenizer.encode(prompt)], SamplingParams(max_tokens=12, temperature=0))[0]
    r = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    chunks = list(
        client.completions.create(model="tiny-test", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_chat_equals_in_process_and_stream_equals_non_stream(client, local):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    want = local.generate([local.tokenizer.encode_chat(msgs)], SamplingParams(max_tokens=10, temperature=0))[0]
    r = client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == want.completion_tokens
    stream = client.chat.completions.create(
        model="tiny-test",
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == want.completion_tokens


def test_concurrent_streaming_clients_each_get_their_solo_output(server, client, local):
    prompts = [f"Request number {i} says" + " more" * (i % 5) for i in range(32)]
    want = [
        o.text
        for o in local.generate(
            [local.tokenizer.encode(p) for p in prompts], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
        )
    ]
    got = [None] * len(prompts)
    peak, done = [0.0], threading.Event()

    def one(i):
        s = client.completions.create(
            model="tiny-test",
            prompt=prompts[i],
            max_tokens=48,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        got[i] = "".join(c.choices[0].text for c in s)

    def watch():  # the engine's running batch, as /metrics reports it, while the streams are open
        while not done.is_set():
            peak[0] = max(peak[0], running_sequences(server))
            time.sleep(0.05)

    attention = serve.get_deployment_handle("AttentionWorker", app_name="mixserve")
    before = attention.stats.remote().result()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    done.set()
    watcher.join()
    assert got == want
    # The streams really share the engine's batch: no deployment-level cap (Serve's default is 5
    # requests per replica) holds them back in a queue.
    assert peak[0] > 8, f"at most {peak[0]} of 32 concurrent streams were ever in the running batch"
    # ... and their outputs reach the ingress together: one message per step for all of them
    # (cluster/serve/outputs.py), not one Ray item per stream and step.
    after = attention.stats.remote().result()
    outputs, messages = after.outputs_streamed - before.outputs_streamed, after.output_messages - before.output_messages
    assert outputs >= len(prompts) and outputs >= 4 * messages, f"{outputs} outputs in {messages} messages"


BAD = [
    (b"{not json", 400, None),
    (b"\xff\xfe", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "tiny-test", "prompt": "x", "max_tokens": -5}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny-test", "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny-test", "prompt": "x", "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny-test", "prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"model": "tiny-test", "prompt": "x", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny-test", "prompt": "x", "n": 0}).encode(), 400, "n"),
    (json.dumps({"model": "tiny-test", "prompt": ["x"] * 20, "n": 20}).encode(), 400, "n"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "tiny-test", "prompt": "word " * 400}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny-test", "prompt": [1, 99999]}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny-test", "prompt": "x", "bogus_field": 1}).encode(), 400, "bogus_field"),
    (json.dumps({"model": "tiny-test"}).encode(), 400, "prompt"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_completion_requests(server, body, status, param):
    code, _, err = post(server + "/v1/completions", body)
    assert code == status
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    if param:
        assert err["error"]["param"] == param


@pytest.mark.parametrize(
    "messages", [[], [{"role": "wizard", "content": "x"}], [{"role": "user"}], [{"role": "assistant", "content": "x"}]]
)
def test_bad_chat_requests(server, messages):
    code, _, err = post(
        server + "/v1/chat/completions", json.dumps({"model": "tiny-test", "messages": messages}).encode()
    )
    assert code == 400 and err["error"]["type"] == "invalid_request_error"


def test_oversize_body_and_unknown_route(server):
    code, _, err = post(server + "/v1/completions", b'{"model": "tiny-test", "prompt": "' + b"a" * (2 << 20) + b'"}')
    assert code == 413 and "limit" in err["error"]["message"]
    code, _, err = post(server + "/v1/nothing", b"{}")
    assert code == 404 and err["error"]["type"] == "not_found_error"


def test_server_still_answers_after_bad_input(client):
    r = client.completions.create(model="tiny-test", prompt="Still alive", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-test", prompt="x", max_tokens=-1)


def test_metrics_parse_and_move_with_traffic(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        with urllib.request.urlopen(server + "/metrics", timeout=60) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    before = scrape()
    client.completions.create(model="tiny-test", prompt="Count me", max_tokens=5, temperature=0, stream=True).close()
    client.completions.create(model="tiny-test", prompt="Count me too", max_tokens=5, temperature=0)
    after = scrape()
    key = ("mixserve_requests_total", (("route", "/v1/completions"), ("status", "200")))
    assert after[key] - before.get(key, 0) == 2
    assert (
        after[("mixserve_generation_tokens_total", ())] - before.get(("mixserve_generation_tokens_total", ()), 0) >= 5
    )
    assert after[("mixserve_time_to_first_token_seconds_count", ())] > before.get(
        ("mixserve_time_to_first_token_seconds_count", ()), 0
    )
    routed = sum(v for (n, _), v in after.items() if n == "mixserve_expert_routed_tokens_total")
    assert routed > sum(v for (n, _), v in before.items() if n == "mixserve_expert_routed_tokens_total")
    assert after[("mixserve_running_sequences", ())] == 0
    assert after[("mixserve_expert_replicas", (("group", "0"),))] == 1
    # vLLM's names and labels, moving with the same traffic (the endpoint picker, inference-perf read them)
    v = (("engine", "0"), ("model_name", "tiny-test"))
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count"):
        assert after[(name, v)] > before.get((name, v), 0), name
    # the stream closed unread may not finish; the second request does
    e2e = ("vllm:e2e_request_latency_seconds_count", v)
    assert after[e2e] - before.get(e2e, 0) >= 1
    done = ("vllm:request_success_total", (("engine", "0"), ("finished_reason", "length"), ("model_name", "tiny-test")))
    assert after[done] - before.get(done, 0) >= 1
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (gauge, v) in after, gauge
    assert after[("vllm:inter_token_latency_seconds_count", v)] > 0


def test_api_key_is_enforced(server, tiny_dir):
    cfg = load_config(
        CONFIG, {"model": tiny_dir, "dtype": "float32", "server.api_key": "sesame", "experts.experts_per_worker": 8}
    )
    serve.run(build_app(cfg), name="keyed", route_prefix="/keyed")
    try:
        body = json.dumps({"model": Path(tiny_dir).name, "prompt": "x", "max_tokens": 2}).encode()
        code, _, err = post(server + "/keyed/v1/completions", body)
        assert code == 401 and err["error"]["type"] == "authentication_error"
        code, _, err = post(server + "/keyed/v1/completions", body, {"Authorization": "Bearer wrong"})
        assert code == 401
        good = openai.OpenAI(base_url=server + "/keyed/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model=Path(tiny_dir).name, prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        serve.delete("keyed")


def test_fuzzed_requests_never_get_a_5xx(server):
    """Bounded property-based fuzz: random JSON bodies (valid fields with wild values, unknown fields,
    wrong types) to both generation routes. Every answer is < 500 and, if an error, OpenAI-shaped."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(
        st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=False), st.text(max_size=40)
    )
    value = st.recursive(
        scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8
    )
    fields = st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from(["tiny-test", "other"]) | value,
            "prompt": st.text(max_size=60) | st.lists(st.integers(-5, 40000), max_size=6) | value,
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": st.text(max_size=30)}
                ),
                max_size=3,
            )
            | value,
            "max_tokens": st.integers(-3, 6) | value,
            "temperature": st.floats(-1, 3) | value,
            "top_p": st.floats(-0.5, 1.5) | value,
            "top_k": st.integers(-2, 50) | value,
            "seed": st.integers(-(2**70), 2**70) | value,
            "stop": st.lists(st.text(max_size=3), max_size=3) | value,
            "stream": st.booleans() | value,
            "n": st.integers(0, 3) | value,
            "logprobs": st.integers(-1, 25) | value,
            "presence_penalty": st.floats(-3, 3) | value,
            "frequency_penalty": st.floats(-3, 3) | value,
            "repetition_penalty": st.floats(-1, 3) | value,
            "min_p": st.floats(-0.5, 1.5) | value,
            "min_tokens": st.integers(-2, 8) | value,
            "echo": st.booleans() | value,
            "logit_bias": st.dictionaries(
                st.integers(-5, 40000).map(str) | st.text(max_size=4), st.floats(-150, 150) | value, max_size=3
            )
            | value,
            "stop_token_ids": st.lists(st.integers(-3, 40000), max_size=3) | value,
            "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | value}) | value,
            "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])}) | value,
            "structured_outputs": st.fixed_dictionaries(
                {},
                optional={
                    "regex": st.text(max_size=6) | value,
                    "choice": st.lists(st.text(max_size=3), max_size=3) | value,
                    "grammar": st.text(max_size=12) | value,
                    "json": st.sampled_from([{}, {"type": "nope"}, {"enum": []}, False, "{", {"maxLength": -1}])
                    | value,
                    "json_object": st.booleans() | value,
                    "whitespace_pattern": st.text(max_size=4) | value,
                },
            )
            | value,
            "include_stop_str_in_output": st.booleans() | value,
            "skip_special_tokens": st.booleans() | value,
        },
    ) | st.dictionaries(st.text(max_size=10), value, max_size=4)

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=fields)
    def check(route, body):
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 6:
            body["max_tokens"] = 6  # keep each generated answer short
        req = urllib.request.Request(
            server + route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        assert status < 500, (route, body, payload[:300])
        if status >= 400:
            assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}

    check()


def test_client_disconnect_frees_its_sequence(server, client):
    import time

    stream = client.completions.create(
        model="tiny-test",
        prompt="Long story",
        max_tokens=240,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    assert running_sequences(server) == 1  # ~240 tokens take far longer than this check
    stream.close()
    deadline = time.monotonic() + 5
    while running_sequences(server) != 0:
        assert time.monotonic() < deadline, "the abandoned sequence is still running"
        time.sleep(0.2)


def test_grpc_unary_and_streaming(grpc_port, server, local):
    import grpc

    from cluster.proto import mixserve_pb2 as pb
    from cluster.proto.mixserve_pb2_grpc import MixServeStub

    prompt = "Over gRPC"
    want = local.generate([local.tokenizer.encode(prompt)], SamplingParams(max_tokens=9, temperature=0))[0]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = MixServeStub(ch)
        r = stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=9, temperature=0), timeout=60)
        assert (r.text, list(r.token_ids), r.finish_reason) == (want.text, want.new_token_ids, want.finish_reason)
        assert (r.prompt_tokens, r.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
        parts = list(stub.GenerateStream(pb.GenerateRequest(prompt=prompt, max_tokens=9, temperature=0), timeout=60))
        assert "".join(p.text for p in parts) == want.text and parts[-1].finished
        assert [t for p in parts for t in p.token_ids] == want.new_token_ids
        # an unset temperature is HTTP's default (1.0): the same seeded sample over both
        seeded = stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=9, seed=5, ignore_eos=True), timeout=60)
        http = urllib.request.urlopen(
            urllib.request.Request(
                server + "/v1/completions",
                data=json.dumps(
                    {"model": "tiny-test", "prompt": prompt, "max_tokens": 9, "seed": 5, "ignore_eos": True}
                ).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=60,
        )
        assert seeded.text == json.loads(http.read())["choices"][0]["text"] and seeded.text != want.text
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompt=prompt, temperature=7), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()
        # Serve's gRPC health service answers OK (an unhealthy one raises UNAVAILABLE). Behind HAProxy
        # (cluster/config.py SERVE_ENV) HAProxy answers for it with a trailers-only OK: no message.
        from ray.serve.generated import serve_pb2, serve_pb2_grpc

        health = serve_pb2_grpc.RayServeAPIServiceStub(ch).Healthz(serve_pb2.HealthzRequest(), timeout=30)
        assert health is None or health.message == "success"


def test_logprobs_match_the_engine(client, local):
    import math

    prompt = "Probabilities please"
    want = local.generate([local.tokenizer.encode(prompt)], SamplingParams(max_tokens=4, temperature=0, logprobs=2))[0]
    r = client.completions.create(model="tiny-test", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    for got, (_, ref, _) in zip(lp.token_logprobs, want.logprobs):
        assert math.isclose(got, ref, abs_tol=1e-4)
    msgs = [{"role": "user", "content": prompt}]
    want = local.generate([local.tokenizer.encode_chat(msgs)], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[
        0
    ]
    r = client.chat.completions.create(
        model="tiny-test", messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert [round(c.logprob, 4) for c in content] == [round(x[1], 4) for x in want.logprobs]
    assert all(len(c.top_logprobs) == 3 for c in content)
    chunks = list(
        client.chat.completions.create(
            model="tiny-test", messages=msgs, max_tokens=4, temperature=0, logprobs=True, stream=True
        )
    )
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert len(streamed) == 4


def test_overload_gets_503_with_retry_after(server, tiny_dir):
    """A burst far past capacity (1 running + 1 waiting allowed, 48 sent at once): the excess gets a
    prompt 503 + Retry-After, admitted requests finish, and the attention worker's memory stays within
    its KV budget (allocated up front) plus a fixed margin."""
    cfg = load_config(
        CONFIG,
        {
            "model": tiny_dir,
            "dtype": "float32",
            "experts.experts_per_worker": 8,
            "engine.max_num_seqs": 1,
            "engine.max_waiting": 1,
            "server.served_model_name": "small",
        },
    )
    serve.run(build_app(cfg), name="small", route_prefix="/small")
    try:
        attention = serve.get_deployment_handle("AttentionWorker", app_name="small")
        before = attention.stats.remote().result()
        body = json.dumps(
            {"model": "small", "prompt": "Busy", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        ).encode()
        results, seconds = [None] * 48, [0.0] * 48

        def one(i):
            t0 = time.perf_counter()
            results[i] = post(server + "/small/v1/completions", body)
            seconds[i] = time.perf_counter() - t0

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        codes = sorted(r[0] for r in results)
        assert set(codes) == {200, 503}, codes
        assert codes.count(200) >= 2  # one running + one waiting are always admitted
        for code, headers, payload in results:
            if code == 503:
                assert headers.get("retry-after") or headers.get("Retry-After")
                assert payload["error"]["code"] == "overloaded"
            else:
                assert payload["usage"]["completion_tokens"] == 40
        refused = sorted(t for t, r in zip(seconds, results) if r[0] == 503)
        served = sorted(t for t, r in zip(seconds, results) if r[0] == 200)
        assert refused[len(refused) // 2] < served[len(served) // 2], (refused, served)  # refusals are prompt
        after = attention.stats.remote().result()
        assert after.pid == before.pid
        margin = 64 << 20
        assert after.rss_bytes - before.rss_bytes < margin, (before.rss_bytes, after.rss_bytes)
        mc = MixtralConfig.from_file(tiny_dir)
        per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 4  # (k, v), float32
        slots = cfg.engine.kv_cache_tokens // cfg.engine.block_size * cfg.engine.block_size + 1  # + the scratch slot
        budget = slots * per_token
        assert after.kv_bytes == before.kv_bytes == budget
        code, _, payload = post(server + "/small/v1/completions", body)  # and it still serves afterwards
        assert code == 200
    finally:
        serve.delete("small")
