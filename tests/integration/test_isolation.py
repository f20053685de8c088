"""Trying to break isolation through the real server: values at the edges of every field's type, sent
over HTTP and gRPC while greedy streams run. Every fuzzed request gets a 4xx in the OpenAI shape (or
the matching gRPC status) or a valid answer; every other stream finishes with exactly its solo text;
the API key guards gRPC as it guards HTTP."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.load import Clients
from cluster.build import local_engine
from cluster.config import AppConfig
from cluster.proto import mixserve_pb2 as pb
from cluster.proto.mixserve_pb2_grpc import MixServeStub
from model.sampling import SamplingParams
from tests.support import serve_app

pytestmark = pytest.mark.ray
KEY = "isolation-key"
MODEL = "tiny-iso"
PROMPTS = ["Once upon a time", "The capital of France is", "1 2 3 4", "Résumé: naïve café"]
MAX_REQUEST_BYTES = 64 << 10


@pytest.fixture(scope="module")
def server(grpc_port, tiny_dir):
    cfg = AppConfig(
        model=tiny_dir,
        dtype="float32",
        engine={"max_model_len": 256, "num_microbatches": 2},
        attention={"num_cpus": 0},
        experts={"num_cpus": 0, "experts_per_worker": 4},
        server={"served_model_name": MODEL, "api_key": KEY, "max_request_bytes": MAX_REQUEST_BYTES},
    )
    with serve_app(cfg, "iso", grpc_port) as base:
        yield base


@pytest.fixture(scope="module")
def solo(tiny_dir) -> list[str]:
    eng = local_engine(tiny_dir, "float32")
    outs = eng.generate(
        [eng.tokenizer.encode(p) for p in PROMPTS], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    )
    return [o.text for o in outs]


class Streams(Clients):
    """`n` greedy SSE streams back to back; each finished text is compared with its solo text."""

    def __init__(self, base: str, want: list[str], n: int = 4):
        self.client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.want = want
        self.done = self.identical = 0
        self.errors: list[str] = []
        super().__init__(n)

    def run(self, i: int) -> None:
        k = i
        while not self.stop.is_set():
            p, k = k % len(PROMPTS), k + 1
            try:
                text = "".join(
                    c.choices[0].text
                    for c in self.client.completions.create(
                        model=MODEL,
                        prompt=PROMPTS[p],
                        max_tokens=24,
                        temperature=0,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    if c.choices
                )
                self.done += 1
                self.identical += text == self.want[p]
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(f"{type(e).__name__}: {e}"[:300])


def post_raw(url: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
    req = urllib.request.Request(url, data=body, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check_answer(status: int, payload: bytes, what) -> None:
    assert status < 500, (what, status, payload[:300])
    if status >= 400:
        assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}, what
        return
    if payload.startswith(b"data:"):  # a stream: events, then [DONE], never an error event for bad input
        events = [line[6:] for line in payload.decode().split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", what
        assert all("error" not in json.loads(e) for e in events[:-1]), (what, payload[-300:])
    else:
        assert json.loads(payload)["choices"], what


FLOATS = [
    0.0,
    -0.0,
    5e-324,
    1e-300,
    1e-45,
    1e-6,
    1e-5,
    0.5,
    1.0,
    2.0,
    2.0000001,
    -1e-300,
    1e300,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    3.4e38,
]
INTS = [
    0,
    1,
    -1,
    2,
    31999,
    32000,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**23,
    -(10**30),
]
STRINGS = ["", "\x00", "a\x00b", "\ud800", "x\udfffy", "\U0001f600", "é" * 50, "</s>", "<s>", "[INST]", " ", "\n" * 20]
edge_float = st.sampled_from(FLOATS) | st.floats(allow_nan=False, allow_infinity=False)
edge_int = st.sampled_from(INTS) | st.integers(-(2**70), 2**70)
edge_str = st.sampled_from(STRINGS) | st.text(max_size=20)
any_value = st.one_of(
    st.none(),
    st.booleans(),
    edge_int,
    edge_float,
    edge_str,
    st.lists(edge_int, max_size=4),
    st.lists(edge_str, max_size=4),
    st.dictionaries(edge_str, edge_int, max_size=2),
)


def bodies():
    return st.fixed_dictionaries(
        {"model": st.just(MODEL)},
        optional={
            "prompt": edge_str
            | st.lists(edge_int, min_size=1, max_size=6)
            | st.lists(edge_str, min_size=1, max_size=2)
            | any_value,
            "max_tokens": edge_int | any_value,
            "temperature": edge_float | edge_int | any_value,
            "top_p": edge_float | any_value,
            "top_k": edge_int | edge_float | any_value,
            "seed": edge_int | any_value,
            "stop": st.lists(edge_str, max_size=20) | edge_str | any_value,
            "stop_token_ids": st.lists(edge_int, max_size=4) | any_value,
            "logprobs": edge_int | any_value,
            "n": edge_int,
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | any_value,
            "ignore_eos": st.booleans() | any_value,
            "presence_penalty": edge_float,
            "user": edge_str,
        },
    )


def chat_bodies():
    msg = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
            "content": edge_str
            | st.lists(
                st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": edge_str}), max_size=2
            ),
        }
    )
    return bodies().flatmap(
        lambda b: st.lists(msg, max_size=3).map(
            lambda m: {k: v for k, v in b.items() if k not in ("prompt", "logprobs")} | {"messages": m}
        )
    )


def shorten(body: dict) -> dict:
    """Keep valid generations short: the fuzz is about values, not lengths."""
    mt = body.get("max_tokens")
    if isinstance(mt, int) and not isinstance(mt, bool) and 8 < mt < 10**6:
        body["max_tokens"] = 8
    body.setdefault("max_tokens", 8)
    return body


RAW_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,  # deep nesting
    b'{"model": "tiny-iso", "prompt": "x", "a": ' + b"[" * 200 + b"]" * 200 + b"}",
    b'{"model": "tiny-iso", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # an integer of thousands of digits
    b'{"model": "tiny-iso", "prompt": "x", "temperature": 1' + b"0" * 400 + b".5}",
    b'{"model": "tiny-iso", "prompt": "x", "temperature": 1e999}',
    b'{"model": "tiny-iso", "prompt": "x", "temperature": NaN}',
    b'{"model": "tiny-iso", "prompt": "x", "top_p": -Infinity}',
    b'{"model": "tiny-iso", "prompt": "\\ud800"}',  # a lone surrogate
    b'{"model": "tiny-iso", "prompt": "ok", "stop": ["\\udfff"]}',
    b'{"model": "tiny-iso", "messages": [{"role": "user", "content": "\\ud83d"}]}',
    b'{"model": "tiny-iso", "prompt": "x", "seed": 18446744073709551616}',  # 2^64
    b'{"model": "tiny-iso", "prompt": "x", "temperature": 1e-300, "max_tokens": 4}',
    b'{"model": "tiny-iso", "prompt": "x", "top_k": 1e23, "max_tokens": 4}',
    b'{"model": "tiny-iso", "prompt": "x", "top_p": 5e-324, "max_tokens": 4}',
    b'{"model": "tiny-iso", "prompt": "\x00\x00", "max_tokens": 2}',
    b"\xff\xfe{}",  # not UTF-8
    b"",
    b"null",
    b'"just a string"',
    b'{"model": "tiny-iso", "prompt": ' + json.dumps("a" * (MAX_REQUEST_BYTES + 10)).encode() + b"}",  # over the limit
]


def test_fuzzed_http_requests_never_hurt_other_streams(server, solo):
    routes = ["/v1/completions", "/v1/chat/completions"]

    @settings(max_examples=70, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=bodies(), chat=chat_bodies(), which=st.integers(0, 1))
    def fuzz(body, chat, which):
        b = shorten(chat if which else body)
        data = json.dumps(b).encode("utf-8", "surrogatepass")
        status, payload = post_raw(server + routes[which], data)
        check_answer(status, payload, (routes[which], b))

    with Streams(server, solo) as streams:
        for raw in RAW_BODIES:
            for r in routes:
                status, payload = post_raw(server + r, raw)
                check_answer(status, payload, (r, raw[:80]))
        fuzz()
    assert not streams.errors, streams.errors[:3]
    assert streams.done >= 4 and streams.identical == streams.done, (streams.done, streams.identical)


def test_the_issue_values_get_clear_answers(server):
    """The values that once took a replica down: answered, as greedy or as a clear 400."""
    url = server + "/v1/completions"
    for extra, want in [
        ({"temperature": 1e-300}, 200),
        ({"top_k": 10**23}, 400),
        ({"top_p": 5e-324}, 200),
        ({"seed": 2**70}, 400),
        ({"prompt": "\ud800"}, 400),
    ]:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3} | extra
        status, payload = post_raw(url, json.dumps(body).encode("utf-8", "surrogatepass"))
        assert status == want, (extra, payload[:300])
        if status == 400:
            err = json.loads(payload)["error"]
            assert err["type"] == "invalid_request_error" and err["message"], extra


def test_a_lying_content_length_is_refused_before_the_body(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {10**12}\r\n\r\n{{".encode()
        )
        answer = s.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]


def grpc_call(stub, req, metadata=(("authorization", f"Bearer {KEY}"),)):
    try:
        r = stub.Generate(req, metadata=metadata, timeout=120)
        return grpc.StatusCode.OK, r
    except grpc.RpcError as e:
        return e.code(), e.details()


def test_grpc_checks_the_key_and_fuzzed_values_never_hurt_other_streams(grpc_port, server, solo):
    ok = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    u32 = st.sampled_from([0, 1, 8, 31999, 32000, 2**31, 2**32 - 1])
    f32 = st.sampled_from([0.0, 1e-45, 1e-30, 1e-5, 0.5, 1.0, 2.0, 3.0, float("nan"), float("inf"), -1.0, 3.4e38])
    i32 = st.sampled_from([-(2**31), -1, 0, 1, 31999, 32000, 2**31 - 1])

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = MixServeStub(ch)
        req = pb.GenerateRequest(prompt="Hi", max_tokens=2)
        assert grpc_call(stub, req, metadata=())[0] == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_call(stub, req, metadata=(("authorization", "Bearer wrong"),))[0] == grpc.StatusCode.UNAUTHENTICATED
        code, r = grpc_call(stub, req)
        assert code == grpc.StatusCode.OK and r.completion_tokens == 2
        code, details = grpc_call(stub, pb.GenerateRequest(prompt="x" * (MAX_REQUEST_BYTES + 1)))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), details

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(
            prompt=st.sampled_from(["", "\x00", "Hi", "é" * 30]),
            ids=st.lists(i32, max_size=4),
            mt=u32,
            temp=f32,
            top_p=f32,
            top_k=u32,
            seed=st.none() | st.sampled_from([-(2**63), 0, 2**63 - 1]),
            stop=st.lists(st.sampled_from(["", "a", "\x00", "é"]), max_size=20),
            eos=st.booleans(),
        )
        def fuzz(prompt, ids, mt, temp, top_p, top_k, seed, stop, eos):
            kw = dict(
                prompt=prompt,
                prompt_token_ids=ids,
                max_tokens=min(mt, 8) if 0 < mt < 10**6 else mt,
                temperature=temp,
                top_p=top_p,
                top_k=top_k,
                stop=stop,
                ignore_eos=eos,
            )
            if seed is not None:
                kw["seed"] = seed
            code, r = grpc_call(stub, pb.GenerateRequest(**kw))
            assert code in ok, (kw, code, r)

        with Streams(server, solo) as streams:
            fuzz()
    assert not streams.errors, streams.errors[:3]
    assert streams.done >= 2 and streams.identical == streams.done, (streams.done, streams.identical)


def direct_grpc_ports() -> list[int]:
    """The ports in Serve's direct-ingress gRPC range that the ingress replicas listen on: their own
    gRPC servers (and any of their other servers whose ephemeral port falls in that range)."""
    import psutil
    from ray.serve._private import constants as c

    lo, hi = c.RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT, c.RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT
    ingress = {p.pid for p in psutil.process_iter(["cmdline"]) if "OpenAIIngress" in " ".join(p.info["cmdline"] or [])}
    return sorted(
        {
            x.laddr.port
            for x in psutil.net_connections("tcp")
            if x.status == "LISTEN" and x.pid in ingress and lo <= x.laddr.port <= hi
        }
    )


def test_grpc_from_another_host_is_refused_when_bound_to_loopback(grpc_port, server):
    """With server.host on loopback the ingress takes gRPC calls from this host only. The front
    (HAProxy) listens on loopback alone, or, where it listens everywhere (Serve's Python proxy), the
    ingress refuses the call; each ingress replica's own gRPC port (direct ingress: Serve binds it on
    every interface) refuses it too. Reach them through another local address where there is one."""
    from cluster.config import serve_mode_env

    other = ray.util.get_node_ip_address()  # this machine's own address, the one Ray itself uses
    if other.startswith("127."):
        pytest.skip("this host has no non-loopback address to call from")
    direct = direct_grpc_ports()
    if serve_mode_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        assert direct, "direct ingress is on but no ingress replica listens for gRPC"
    codes = {}
    for port in [grpc_port, *direct]:
        try:
            socket.create_connection((other, port), timeout=5).close()
        except ConnectionRefusedError:
            assert port == grpc_port, f"ingress replica port {port} not listening on {other}"
            continue  # the front is not reachable from another address at all
        with grpc.insecure_channel(f"{other}:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            codes[port], details = grpc_call(MixServeStub(ch), pb.GenerateRequest(prompt="Hi", max_tokens=2))
        # refused; or (a replica's internal Serve server, not the API) no MixServe service there
        assert codes[port] in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED), (port, details)
    if direct:  # each ingress replica's own API port was among them, and it refused
        assert grpc.StatusCode.PERMISSION_DENIED in [codes[p] for p in direct], codes


@pytest.mark.parametrize(
    "peer,local",
    [
        ("ipv4:127.0.0.1:5555", True),
        ("ipv6:%5B::1%5D:5555", True),
        ("ipv6:[::ffff:127.0.0.1]:1", True),
        ("ipv4:10.0.0.2:4", False),
        ("ipv6:[2001:db8::1]:80", False),
        ("", False),
        ("garbage", False),
    ],
)
def test_peer_addresses_are_read_as_gRPC_writes_them(peer, local):
    from cluster.api.ingress import _peer_host, is_loopback

    assert is_loopback(_peer_host(peer)) is local
