"""Helpers the tests share (not fixtures: those are in conftest.py): free ports, a served application,
a server's banner, `serve run` of a config, a checkpoint written by transformers."""

from __future__ import annotations

import contextlib
import os

import torch

from benchmarks.bench import free_port  # noqa: F401 - the tests' free ports are the bench's


def hf_checkpoint(
    path, *, kv_heads=2, experts=4, top_k=2, dtype=torch.float32, shard=False, layers=2, seed=0, old_form=False
):
    """A random MixtralForCausalLM written by transformers itself (save_pretrained)."""
    from transformers import MixtralConfig as HFConfig
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    c = HFConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    m = MixtralForCausalLM(c)
    with torch.no_grad():  # larger weights than HF's init, so logits have a real spread
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5 if "embed" not in n else 1.0)
    m = m.to(dtype).eval()
    m.save_pretrained(path, max_shard_size="200KB" if shard else "10GB")
    if old_form:  # rewrite config.json in the older Hub form (rope_theta, torch_dtype at top level)
        import json

        cfgp = path / "config.json"
        d = json.loads(cfgp.read_text())
        d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
        d["torch_dtype"] = d.pop("dtype")
        cfgp.write_text(json.dumps(d))
    return m


@contextlib.contextmanager
def serve_app(cfg, name: str, grpc_port: int):
    """A local Ray (2 CPUs) with Serve's HTTP proxy on a free loopback port and its gRPC proxy on
    `grpc_port`, the application of `cfg` deployed at "/" under `name`; yields the base URL and
    shuts Serve and Ray down afterwards."""
    import ray
    from ray import serve

    from cluster.cli import GRPC_SERVICER
    from cluster.config import serve_mode_env
    from cluster.serve.app import build_app

    os.environ.update(serve_mode_env())  # the Serve mode `mixserve serve` runs in, for this Ray's processes
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER], "enable_reflection": False},
        )
        serve.run(build_app(cfg), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def metric(base: str, name: str) -> float | None:
    """A series of a server's /metrics, summed over its labels; None where the server exports none."""
    import re
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
        text = r.read().decode()
    found = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(found) if found else None


def running_sequences(base: str) -> float:
    """The engine's running batch as a server's /metrics reports it."""
    got = metric(base, "mixserve_running_sequences")
    if got is None:
        raise AssertionError("no running-sequences gauge")
    return got


def banner(p, timeout_s: float = 400) -> list[str]:
    """The lines a started `mixserve serve` (stdout and stderr in `p.stdout`) printed up to and with
    its banner's curl line; an AssertionError with what it printed when the banner does not come."""
    import time

    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "curl " in line:
            return lines
    p.kill()
    raise AssertionError(f"no banner: {chr(10).join(lines)[-2000:]}")


def serve_run_answer(config_path, port: int, body: dict, cwd, env: dict, timeout_s: float = 180, console=None) -> dict:
    """Start Ray's own `serve run CONFIG` as a subprocess, POST `body` to /v1/completions until it
    answers (or `timeout_s` passes), stop it with SIGINT, and return the answer. `console`: a path
    that gets what the command printed (stdout and stderr)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    serve_bin = Path(sys.executable).with_name("serve")
    out = open(console, "wb") if console else subprocess.DEVNULL  # noqa: SIM115 - closed below
    p = subprocess.Popen(
        [str(serve_bin), "run", str(config_path)],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if console else subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        data = json.dumps(body).encode()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert p.poll() is None, "serve run exited"
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", data=data, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=10) as r:
                    return json.loads(r.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        raise AssertionError(f"no answer from `serve run {config_path}` within {timeout_s} s")
    finally:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
        if console:
            out.close()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    """POST raw bytes as JSON; (status, headers, parsed body), error statuses included."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())
