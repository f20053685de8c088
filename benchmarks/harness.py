"""What the benchmarks share: the request type, percentiles, a progress line, the machine's
description, CPU time by process, free loopback ports, waiting for an HTTP server, the vLLM peer's
interpreter and its server, preset checkpoints, the Serve application under test (`serve_http`), the closed loops that
drive an engine or an HTTP server and their timings, the targets table."""

from __future__ import annotations

import http.client
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import MixtralConfig
from model.sampling import SamplingParams
from model.tiny import preset_config

_HANDED_OUT: set[int] = set()

# ---------------------------------------------------------------- CPU time by process
#
# Where a served token's cost goes between processes: every process on the machine (the benchmark
# has it to itself) is read from /proc before and after a level, and its CPU seconds are put in one
# of these roles. Linux only; elsewhere there is nothing to read and no table.

CPU_ROLES = ("client", "http front", "ingress", "engine", "experts", "control", "other")


def cpu_role(cmdline: str, own_pid: bool) -> str:
    """The role of a process in a served run, from its command line (Ray names its workers
    `ray::<actor>`, Serve its replicas `ray::ServeReplica:<app>:<deployment>`; vLLM titles its
    processes `VLLM::EngineCore`, `VLLM::Worker_TP0`, `VLLM::APIServer_0`; Serve's HAProxy mode runs
    `haproxy` under `ray::HAProxyManager`)."""
    if own_pid or "vllm.benchmarks" in cmdline or " bench serve" in cmdline:
        return "client"
    if "ServeReplica:" in cmdline:
        dep = cmdline.split("ServeReplica:", 1)[1].split()[0].rsplit(":", 1)[-1].split(".", 1)[0]
        if dep.startswith("expert-group"):
            return "experts"
        if dep == "AttentionWorker":
            return "engine"
        if dep == "OpenAIIngress":
            return "ingress"
        return "control"  # the expert directory
    if "ProxyActor" in cmdline or "HAProxyManager" in cmdline or os.path.basename(cmdline.split()[0]) == "haproxy":
        return "http front"  # Serve's Python proxy, or HAProxy and the actor that manages it
    if "vllm.entrypoints" in cmdline or "vllm serve" in cmdline or "VLLM::APIServer" in cmdline:
        return "ingress"  # vLLM's API server: HTTP, tokenising, detokenising, SSE
    if "VLLM::" in cmdline:
        return "engine"  # VLLM::EngineCore (scheduling) and VLLM::Worker_TP0 (the model runner)
    if cmdline.startswith("ray::") or "/ray/" in cmdline.split()[0]:
        return "control"  # raylet, GCS (binaries under ray/), the Serve controller, dashboard agents
    return "other"


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for every process this user can read; {} off Linux. The
    children this process has waited for (vLLM's client, run per level) count as pid -1."""
    out: dict[int, tuple[str, float]] = {}
    if not os.path.isdir("/proc/self"):
        return out
    import resource  # Unix only, like /proc

    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()
        except OSError:  # gone meanwhile
            continue
        if not cmd:  # kernel threads
            continue
        out[int(d)] = (cpu_role(cmd, int(d) == me), (int(fields[11]) + int(fields[12])) / tick)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    out[-1] = ("client", ru.ru_utime + ru.ru_stime)
    return out


def cpu_per_token(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], tokens: int) -> dict:
    """ms of CPU per output token by role between two `process_cpu` snapshots (processes present in
    both), plus the total; {} when there is nothing to read."""
    if not before or not after or tokens <= 0:
        return {}
    ms = dict.fromkeys(CPU_ROLES, 0.0)
    for pid, (role, cpu) in after.items():
        if pid in before and before[pid][0] == role:
            ms[role] += max(0.0, cpu - before[pid][1])
    out = {k: round(1e3 * v / tokens, 3) for k, v in ms.items()}
    out["total"] = round(sum(out.values()), 3)
    return out


@dataclass
class Req:
    prompt: list[int]
    out_len: int
    temperature: float = 0.0  # 0 = greedy; vLLM's bench client samples at 1.0 unless told otherwise


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def has_amx() -> bool:
    """The CPU has AMX tiles (bf16 matrix work ~5-8x cheaper than float32: figures differ in kind)."""
    try:
        return any(line.startswith("flags") and " amx_bf16" in line for line in open("/proc/cpuinfo"))
    except OSError:
        return False


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Progress:
    """One self-overwriting status line on stderr."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.t0 = what, total, 0, time.perf_counter()
        self.show()

    def step(self, n: int = 1) -> None:
        self.done += n
        self.show()

    def show(self) -> None:
        w = 24
        fill = int(w * self.done / max(1, self.total))
        print(
            f"\r[bench] {self.what:<34} [{'#' * fill}{'.' * (w - fill)}] {self.done}/{self.total} "
            f"{time.perf_counter() - self.t0:6.1f}s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


def vllm_python(a) -> str | None:
    """The interpreter of the environment vLLM is installed in (--vllm-python, or MIXSERVE_VLLM_PYTHON)."""
    py = a.vllm_python or os.environ.get("MIXSERVE_VLLM_PYTHON")
    return (shutil.which(py) or py) if py else None


def wait_http(
    port: int, proc: subprocess.Popen | None, timeout_s: float, what: str, log_path: str | None = None
) -> None:
    """Until GET /v1/models answers 200; a server process that exits first is an error with its log's tail."""
    deadline, t0 = time.monotonic() + timeout_s, time.monotonic()
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log_path).read_text()[-3000:] if log_path else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        print(f"\r[bench] waiting for {what}: {time.monotonic() - t0:5.0f} s", end="", file=sys.stderr, flush=True)
        time.sleep(1)
    raise RuntimeError(f"{what} not ready in {timeout_s} s")


def free_port() -> int:
    """A loopback port free now, outside the kernel's ephemeral range (where any outgoing connection,
    Ray's own included, may take it before the server binds: a port from bind(0) is in that range)
    and above Ray's worker ports (10002-19999), never the same one twice in a process."""
    try:
        lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    candidates = [p for p in range(20000, 65535) if not lo <= p <= hi and p not in _HANDED_OUT]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


def checkpoint_name(preset: str, model: str | None) -> str:
    """What a run's files and headers are named after: the folder given with --model, else the preset."""
    return os.path.basename(os.path.normpath(os.path.expanduser(model))) if model else preset


def preset_for(name: str, layers: int | None) -> MixtralConfig:
    over = {"num_hidden_layers": layers} if layers else {}
    if name == "mixtral-8x7b" and not torch.cuda.is_available() and not layers:
        over = {"num_hidden_layers": 1}  # a layer slice on CPU: one real-shape layer is ~3.3 GB in bf16
    return preset_config(name, **over)


def serve_http(model_dir, dname, ecfg, record, a) -> None:
    from ray import serve

    from cluster.config import AppConfig
    from cluster.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = AppConfig(
        model=model_dir,
        dtype=dname,
        engine=ecfg.model_dump() | {"num_microbatches": a.microbatches},
        attention={"num_cpus": 0, "num_threads": a.served_attention_threads},
        experts={
            "num_cpus": 0,
            "experts_per_worker": a.served_experts_per_worker,
            "num_threads": a.served_expert_threads,
        },
        server={"served_model_name": "bench", "metrics_refresh_s": 0},
    )
    serve.run(build_app(cfg), name="bench", route_prefix="/")
    try:
        for c in a.concurrency:
            record(c, port)
    finally:
        serve.shutdown()


# ---------------------------------------------------------------- closed loops and their timings


@dataclass
class Timing:
    """One request's measurement: its send time and a time per output token; for session workloads
    its session, turn and prompt length, the prompt tokens the server found cached (where it reports
    them) and the tokens (in-process engines)."""

    start: float
    token_times: list[float] = field(default_factory=list)
    session: int = 0
    turn: int = 0
    prompt_len: int = 0
    cached: int | None = None
    tokens: list[int] = field(default_factory=list)


def summarize(timings: list[Timing], wall: float) -> dict:
    ttft = [(t.token_times[0] - t.start) * 1e3 for t in timings if t.token_times]
    itl = [(b - a) * 1e3 for t in timings for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(len(t.token_times) for t in timings)
    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "seconds": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2),
        "req_s": round(len(timings) / wall, 3),
        "ttft_ms_p50": round(pct(ttft, 50), 2),
        "ttft_ms_p99": round(pct(ttft, 99), 2),
        "itl_ms_p50": round(pct(itl, 50), 2),
        "itl_ms_p99": round(pct(itl, 99), 2),
    }


def closed_loop(convs: list[list[Req]], concurrency: int, send, label: str) -> tuple[list[Timing], float]:
    """`concurrency` client threads, each taking the next session and sending its turns in order with
    `send(session, turn, req) -> Timing` (a plain workload: sessions of one request each). The first
    error stops the run and is raised."""
    results: list[Timing] = []
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


def http_sender(port: int, model: str = "bench"):
    """send() for an OpenAI server: streaming /v1/completions with a token-id prompt, usage included;
    one connection per client thread."""
    local = threading.local()

    def send(s: int, t: int, r: Req) -> Timing:
        conn = getattr(local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        local.conn = conn
        body = {
            "model": model,
            "prompt": r.prompt,
            "max_tokens": r.out_len,
            "temperature": r.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        turn = Timing(time.perf_counter(), session=s, turn=t, prompt_len=len(r.prompt))
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
        # One SSE chunk per engine output; the engine emits one token per step for a decoding request.
        turn.token_times = (chunks + [chunks[-1]] * r.out_len)[: r.out_len] if chunks else []
        return turn

    return send


def in_process_engine(model_dir: str, dname: str, ecfg, **update):
    """The in-process system's engine: `ecfg` with `update`, at one micro-batch. Its experts answer on
    submit, so a second micro-batch overlaps nothing and only reads every expert's weights once more
    per step (mini, bf16, c=16: half the tok/s)."""
    from cluster.build import local_engine

    return local_engine(model_dir, dname, ecfg.model_copy(update={"num_microbatches": 1, **update}))


def engine_loop(engine, convs: list[list[Req]], concurrency: int, label: str) -> tuple[list[Timing], float]:
    """The closed loop over sessions, driving an in-process engine from this thread: `concurrency`
    sessions in flight, each with one turn at a time; a timestamp for every output token."""
    bar = Progress(label, sum(len(c) for c in convs))
    queue = list(range(len(convs)))[::-1]
    live: dict[str, tuple[int, int, Timing]] = {}
    results: list[Timing] = []

    def add(s: int, t: int) -> None:
        r = convs[s][t]
        rid = engine.add_request(
            r.prompt, SamplingParams(max_tokens=r.out_len, temperature=r.temperature, ignore_eos=True)
        )
        live[rid] = (s, t, Timing(time.perf_counter(), session=s, turn=t, prompt_len=len(r.prompt)))

    t0 = time.perf_counter()
    while queue or live:
        while queue and len(live) < concurrency:
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


# ---------------------------------------------------------------- vLLM's server and the targets table


def serve_vllm(python: str, model_dir: str, dname: str, record, a, max_model_len: int, extra: list[str] = ()) -> None:
    """vLLM's OpenAI server on the checkpoint (VLLM_CPU_KVCACHE_SPACE: its KV memory, GiB; `extra`: more
    of its flags); `record(c, port)` for each of a.concurrency, then it stops."""
    port = free_port()
    log_path = os.path.join(tempfile.mkdtemp(prefix="mixserve-vllm-"), "server.log")
    from cluster.config import THREAD_ENV

    # vLLM runs as its users run it: with its own OpenMP settings, not mixserve's THREAD_ENV
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env["VLLM_CPU_KVCACHE_SPACE"] = str(a.vllm_kv_gib)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    cmd += ["--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", dname]
    cmd += ["--max-num-seqs", str(max(64, max(a.concurrency))), "--max-model-len", str(max_model_len), *extra]
    print(f"[bench] starting vLLM's server {' '.join(extra)} (log: {log_path})", file=sys.stderr, flush=True)
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


def targets_table(targets: list[dict]) -> list[str]:
    """A run's targets as markdown lines (a blank line first); none when there are none."""
    if not targets:
        return []
    lines = ["", "| target | want | got | met |", "|---|---|---|---|"]
    return lines + [f"| {t['target']} | {t['want']} | {t['got']} | {'yes' if t['met'] else 'no'} |" for t in targets]
