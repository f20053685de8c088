"""Trying to break cost isolation through the real server: while greedy streams run, requests that are
cheap to send and expensive to answer (pathological bodies, a 1 MiB prompt to tokenise, byte tokens
that never form a character, penalties over a long prompt, many choices, prompt routes, a scrape loop)
each get an answer within a bound; the streams' texts are unchanged and their time stays within 2x
their undisturbed time + 3 s; one request with n=128 at the context does not hold back another's
first token; a client that reads nothing has its stream aborted. Also: the doors (docs, gRPC
reflection) are closed. Figures are printed for the notes."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from cluster.build import local_engine
from cluster.config import AppConfig
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from tests.support import metric, serve_app

pytestmark = pytest.mark.ray
MODEL = "tiny-cost"
PROMPTS = ["Once upon a time", "The capital of France is", "1 2 3 4", "Résumé: naïve café"]
CONTEXT = 1024
VICTIM_TOKENS = 24
STALL_S = 3.0


@pytest.fixture(scope="module")
def server(grpc_port, tiny_dir):
    cfg = AppConfig(
        model=tiny_dir,
        dtype="float32",
        engine={"max_model_len": CONTEXT, "num_microbatches": 2},
        attention={"num_cpus": 0},
        experts={"num_cpus": 0, "experts_per_worker": 4},
        # a budget wide enough that n=128 at the context is accepted: fairness, not the 400, is tested
        server={
            "served_model_name": MODEL,
            "max_request_output_tokens": 1 << 20,
            "metrics_refresh_s": 0,
            "stream_stall_timeout_s": STALL_S,
        },
    )
    with serve_app(cfg, "cost", grpc_port) as base:
        yield base


@pytest.fixture(scope="module")
def solo(tiny_dir) -> list[str]:
    eng = local_engine(tiny_dir, "float32")
    sp = SamplingParams(max_tokens=VICTIM_TOKENS, temperature=0, ignore_eos=True)
    return [o.text for o in eng.generate([eng.tokenizer.encode(p) for p in PROMPTS], sp)]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


def victims(base: str, want: list[str], clients: int = 4, rounds: int = 3) -> tuple[float, int, float]:
    """`clients` threads, each streaming `rounds` greedy requests back to back: (wall time, how many
    texts differ from their solo text, the longest gap between two chunks of one stream)."""
    c = client(base)
    wrong, gap = [0], [0.0]

    def one(i: int) -> None:
        for r in range(rounds):
            p = (i + r) % len(PROMPTS)
            text, last = "", time.perf_counter()
            for ch in c.completions.create(
                model=MODEL,
                prompt=PROMPTS[p],
                max_tokens=VICTIM_TOKENS,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            ):
                now = time.perf_counter()
                gap[0] = max(gap[0], now - last)
                last = now
                text += ch.choices[0].text if ch.choices else ""
            wrong[0] += text != want[p]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return time.perf_counter() - t0, wrong[0], gap[0]


def post(url: str, body: bytes | dict, timeout: float = 300) -> tuple[int, bytes, float]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - t0


def costly(base: str, tok: Tokenizer) -> dict[str, tuple[bytes | dict, str, float]]:
    """name -> (body, route, the most seconds its answer may take)."""
    lead = tok.sp.vocab().index("<0xE2>")
    long_ids = [1] + [(7 * i) % 31000 + 100 for i in range(CONTEXT - 100)]
    return {
        "unterminated escapes (1 MiB)": (
            b'{"model":"m","prompt":"' + b'\\"' * ((1 << 20) // 2 - 40),
            "/v1/completions",
            1.5,
        ),
        "nesting (1 MiB)": (b'{"model":"m","prompt":' + b"[" * ((1 << 20) - 40), "/v1/completions", 1.5),
        "numbers (1 MiB)": (b'{"model":"m","prompt":[' + b"1," * ((1 << 19) - 40) + b"1]}", "/v1/completions", 1.5),
        "tokenize (1 MiB)": ({"model": MODEL, "prompt": "hello world " * 87000}, "/tokenize", 3.0),
        "byte tokens that never form a character": (
            {"model": MODEL, "prompt": "x", "max_tokens": 768, "logit_bias": {str(lead): 100}, "ignore_eos": True},
            "/v1/completions",
            120,
        ),
        "penalties over a long prompt": (
            {
                "model": MODEL,
                "prompt": long_ids,
                "n": 2,
                "max_tokens": 64,
                "repetition_penalty": 1.2,
                "presence_penalty": 0.5,
                "frequency_penalty": 0.5,
                "ignore_eos": True,
            },
            "/v1/completions",
            120,
        ),
        "prompt routes, many choices": (
            {"model": MODEL, "prompt": long_ids[:200], "n": 8, "max_tokens": 4, "return_prompt_routed_experts": True},
            "/v1/completions",
            120,
        ),
    }


def test_a_wave_of_costly_requests_leaves_other_streams_within_their_bound(server, solo, tiny_dir):
    base_time, wrong, base_gap = victims(server, solo)
    assert wrong == 0
    answers: dict[str, tuple[int, float, int]] = {}
    scrapes: list[float] = []

    def send(name, body, route):
        status, payload, took = post(server + route, body)
        answers[name] = (status, took, len(payload))

    def scrape_loop():
        for _ in range(40):
            t0 = time.perf_counter()
            urllib.request.urlopen(server + "/metrics", timeout=60).read()
            scrapes.append(time.perf_counter() - t0)
            time.sleep(0.05)

    wave = costly(server, Tokenizer.for_model(tiny_dir))
    threads = [threading.Thread(target=send, args=(n, b, r)) for n, (b, r, _) in wave.items()]
    threads.append(threading.Thread(target=scrape_loop))
    for t in threads:
        t.start()
    time.sleep(0.2)
    took, wrong, gap = victims(server, solo)
    for t in threads:
        t.join(timeout=600)
    report = {n: (s, round(t, 2), size) for n, (s, t, size) in answers.items()}
    print(
        f"\ncost wave: victims {took:.1f} s (undisturbed {base_time:.1f} s), longest chunk gap {gap:.2f} s "
        f"(undisturbed {base_gap:.2f} s), /metrics p50 {statistics.median(scrapes) * 1000:.0f} ms; {report}"
    )
    assert wrong == 0, "a costly request changed another stream's text"
    for name, (_, _, limit) in wave.items():
        status, t, _ = answers[name]
        assert status == 200 or 400 <= status < 500, (name, status)
        assert t <= limit, f"{name}: answered after {t:.2f} s (bound {limit} s)"
    assert answers["penalties over a long prompt"][0] == answers["prompt routes, many choices"][0] == 200
    assert took <= 2 * base_time + 3, f"victims took {took:.1f} s against {base_time:.1f} s undisturbed"
    assert len(scrapes) == 40


def test_parsing_and_tokenising_the_largest_bodies_stall_no_stream(server, solo, tiny_dir):
    """Only the bodies at the size limit (pathological JSON, a 1 MiB prompt to tokenise): each is
    answered within 1.5 s of wall time (the tokenised one: plus its tokeniser's own time on this
    machine) and no stream's chunks stop for more than a second meanwhile: large bodies are parsed
    and tokenised off the ingress's event loop."""
    tok = Tokenizer.for_model(tiny_dir)
    wave = {n: v for n, v in costly(server, tok).items() if "MiB" in n}
    answers: dict[str, tuple[int, float]] = {}

    def send(name, body, route):
        for _ in range(2):
            status, _, took = post(server + route, body)
            answers[name] = (status, max(took, answers.get(name, (0, 0.0))[1]))

    threads = [threading.Thread(target=send, args=(n, b, r)) for n, (b, r, _) in wave.items()]
    for t in threads:
        t.start()
    took, wrong, gap = victims(server, solo, rounds=2)
    for t in threads:
        t.join(timeout=300)
    # Tokenising 1 MiB is SentencePiece's own work (~0.4 s on a fast core, GIL released): its answer
    # may take that, measured here, three times over (the cores are shared) on top of the 1.5 s bound.
    text = wave["tokenize (1 MiB)"][0]["prompt"]
    t0 = time.perf_counter()
    tok.encode(text)
    encode_s = time.perf_counter() - t0
    bound = {n: 1.5 + (3 * encode_s if n.startswith("tokenize") else 0.0) for n in wave}
    print(f"\nlargest bodies: longest chunk gap {gap:.2f} s; {answers}; local encode {encode_s:.2f} s")
    assert wrong == 0 and len(answers) == len(wave)
    assert all(s == 200 or 400 <= s < 500 for s, _ in answers.values()), answers
    assert all(t < bound[n] for n, (_, t) in answers.items()), (answers, bound)  # wall time, cores shared
    assert gap < 1.0, f"a stream stalled {gap:.2f} s while the bodies were parsed"


def test_n_128_at_the_context_does_not_hold_back_another_requests_first_token(server):
    """The victim's TTFT under the flood against 2x its TTFT alone + two steps of the flooded engine
    (a step: the victim's own inter-token time under the flood, every step decodes it once). Without
    the fair share it would wait for the flood's whole run (minutes); with it the victim is admitted in
    the step after it arrives (the target is 2x + one step; the second is slack for a noisy 2-core
    machine, the printed figures say which was met)."""
    c = client(server)

    def timed() -> tuple[float, float]:
        t0 = time.perf_counter()
        s = c.completions.create(
            model=MODEL, prompt="Quick", max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        stamps = [time.perf_counter() for ch in s if ch.choices and ch.choices[0].text]
        itl = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 2 else 0.0
        return stamps[0] - t0, itl

    alone = statistics.median(timed()[0] for _ in range(5))
    chunks = [0]
    stop = threading.Event()

    def attacker():
        s = c.completions.create(
            model=MODEL,
            prompt="Flood",
            n=128,
            max_tokens=CONTEXT - 8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for _ in s:
            chunks[0] += 1
            if stop.is_set():
                break
        s.close()

    t = threading.Thread(target=attacker)
    t.start()
    deadline = time.monotonic() + 120
    while chunks[0] < 400 and time.monotonic() < deadline:  # its choices are running and decoding
        time.sleep(0.1)
    loaded = [timed() for _ in range(5)]
    stop.set()
    t.join(timeout=120)
    got = statistics.median(x for x, _ in loaded)
    step = statistics.median(s for _, s in loaded)
    print(
        f"\nn=128 flood: victim TTFT p50 {got * 1000:.0f} ms "
        f"(alone {alone * 1000:.0f} ms, one step {step * 1000:.0f} ms)"
    )
    assert chunks[0] >= 400, "the n=128 request never got going"
    assert got <= 2 * alone + 2 * step, f"TTFT {got:.3f} s under n=128 against {alone:.3f} s alone, step {step:.3f} s"


def test_docs_and_grpc_reflection_are_closed(grpc_port, server):
    for path in ("/docs", "/openapi.json", "/redoc"):
        try:
            urllib.request.urlopen(server + path, timeout=30)
            code = 200
        except urllib.error.HTTPError as e:
            code = e.code
        assert code == 404, path
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(
                stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
            )
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def gauge(base: str, name: str) -> float:
    got = metric(base, name)
    assert got is not None, f"the server exports no {name}"
    return got


def wait_freed(server: str, stalls0: float, tokens0: float) -> tuple[float | None, float | None, float]:
    """Poll until the server has counted a stall and runs no request (up to 120 s): (seconds it
    took, None if it never did; requests still running; tokens generated since `tokens0`)."""
    t0, running = time.perf_counter(), None
    freed_after = None
    while time.perf_counter() - t0 < 120:
        running = gauge(server, "vllm:num_requests_running")
        if running == 0 and gauge(server, "mixserve_stream_stalls_total") > stalls0:
            freed_after = time.perf_counter() - t0
            break
        time.sleep(0.5)
    return freed_after, running, gauge(server, "mixserve_generation_tokens_total") - tokens0


def test_a_client_that_reads_nothing_has_its_stream_aborted_and_its_sequences_freed(server, solo):
    """A chat stream of 48 choices x ~1000 tokens with top-20 logprobs (~2 KB of SSE per token,
    ~90 MB in all: several times what HAProxy and the sockets between the ingress and the client
    buffer on loopback, ~17 MB measured, so that an abort lands well before the budget) to a
    client with a 4 KiB receive buffer that reads only the first bytes. Once the buffers are full the
    ingress's write waits, and after server.stream_stall_timeout_s the request is aborted: its
    sequences leave the batch long before their budget, the socket still open, and the next
    request is served as before."""
    host, port = server.removeprefix("http://").split(":")
    n, max_tokens = 48, CONTEXT - 32
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "n": n,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,
            "temperature": 1.0,
        }
    ).encode()
    stalls0 = gauge(server, "mixserve_stream_stalls_total")
    tokens0 = gauge(server, "mixserve_generation_tokens_total")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 200"), "the stream did not start"
        freed_after, running, generated = wait_freed(server, stalls0, tokens0)
        print(f"[stall] freed after {freed_after} s, {generated:.0f} of {n * max_tokens} tokens generated")
        assert freed_after is not None, f"still {running} running after 120 s with an unread stream"
        assert generated < n * max_tokens / 2, f"{generated} tokens: the request ran to its budget"
        sock.settimeout(0)
        try:
            sock.getpeername()  # the client's connection is still there: it was the ingress that let go
        except OSError:
            pytest.fail("the connection was closed rather than the request aborted")
    finally:
        sock.close()
    out = client(server).completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=VICTIM_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == solo[0]


def replica_grpc_address(app: str) -> str:
    """The gRPC listener of the app's ingress replica itself (direct ingress), from the HAProxy
    configuration Serve wrote. Through HAProxy a 1024-token stream of ~30-byte messages fits in its
    buffers (a 64 KiB HTTP/2 window to the replica, tune.bufsize) and nothing would ever wait."""
    import os
    import re

    import ray
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    # Serve keeps one configuration per node, in a folder named after the node (this test's: the head)
    d, f = os.path.split(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC)
    with open(os.path.join(d, ray.get_runtime_context().get_node_id(), f)) as cfg:
        text = cfg.read()
    name = re.search(rf"(?m)^\s*acl is_(\S+) req.hdr\(application\) -m str {re.escape(app)}$", text).group(1)
    section = re.split(rf"(?m)^backend {re.escape(name)}$", text)[1].split("\nbackend ")[0]
    return re.search(r"(?m)^\s*server SERVE_REPLICA\S* (\S+:\d+) ", section).group(1)


def test_a_grpc_client_that_reads_nothing_has_its_stream_aborted_and_its_sequences_freed(server, solo):
    """GenerateStream to a client whose flow-control window stays shut (it announces 1 KiB of read-ahead
    and never reads): once the buffers on the way are full, the replica's next message waits, and
    after server.stream_stall_timeout_s the request is aborted and its sequence freed, the call still
    open; then the same channel serves a request as before."""
    from cluster.proto import mixserve_pb2 as pb
    from cluster.proto import mixserve_pb2_grpc as pbg

    max_tokens = CONTEXT - 32
    stalls0 = gauge(server, "mixserve_stream_stalls_total")
    tokens0 = gauge(server, "mixserve_generation_tokens_total")
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(replica_grpc_address("cost"), options=options) as ch:
        stub = pbg.MixServeStub(ch)
        call = stub.GenerateStream(
            pb.GenerateRequest(prompt="Hi", max_tokens=max_tokens, ignore_eos=True, temperature=1.0), timeout=300
        )
        try:
            assert next(call).completion_tokens >= 0  # started; nothing more is read
            freed_after, running, generated = wait_freed(server, stalls0, tokens0)
            print(f"[grpc stall] freed after {freed_after} s, {generated:.0f} of {max_tokens} tokens generated")
            assert freed_after is not None, f"still {running} running after 120 s with an unread stream"
            assert generated < max_tokens, f"{generated} tokens: the request ran to its budget"
            assert call.is_active()  # the call is still open: it was the replica that let go
        finally:
            call.cancel()
        out = stub.Generate(
            pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=VICTIM_TOKENS, temperature=0, ignore_eos=True), timeout=60
        )
        assert out.text == solo[0]
