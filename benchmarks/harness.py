"""What the benchmarks share: the request type, percentiles, a progress line, the machine's
description, free loopback ports, waiting for an HTTP server, the vLLM peer's interpreter, preset
checkpoints and the Serve application under test (`serve_http`)."""

from __future__ import annotations

import http.client
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import MixtralConfig
from model.tiny import preset_config

_HANDED_OUT: set[int] = set()


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
