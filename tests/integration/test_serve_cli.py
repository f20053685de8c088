"""`serve run configs/serve.yaml` (Ray's own CLI) runs the same application."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.support import banner, free_port, serve_run_answer

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_validates_with_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text()))


def test_serve_run_serves_the_app(tmp_path, tiny_dir):
    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    port, gport = free_port(), free_port()
    cfg["http_options"]["port"] = port
    cfg["grpc_options"]["port"] = gport
    cfg["applications"][0]["args"] = {
        "config": str(ROOT / "configs" / "tiny.yaml"),
        "model": tiny_dir,
        "server": {"served_model_name": "via-serve-run"},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    console = tmp_path / "console.txt"
    answer = serve_run_answer(
        path,
        port,
        {"model": "via-serve-run", "prompt": "Hello", "max_tokens": 4},
        ROOT,
        {**os.environ, "PYTHONPATH": str(ROOT)},
        console=console,
    )
    assert answer["usage"]["completion_tokens"] == 4 and answer["model"] == "via-serve-run"
    # quiet: the directory's heartbeats (every second per expert replica) print no access-log lines
    printed = console.read_text(errors="replace")
    chatter = [line for line in printed.splitlines() if "CALL register" in line or "CALL view" in line]
    assert not chatter, f"{len(chatter)} directory call lines on the console, e.g. {chatter[:2]}"


def test_mixserve_serve_ignores_a_stale_ray_cluster_file(tiny_dir):
    """A ray_current_cluster file naming a cluster that is gone (Ray leaves it behind after a crash)
    does not stop `mixserve serve`: without RAY_ADDRESS it starts its own local Ray, and that Ray runs
    no dashboard modules (no job API, which runs code; no web server) unless --ray-dashboard asks."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")  # nothing listens
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
    port, gport = free_port(), free_port()
    cmd = [sys.executable, "-m", "cluster", "serve", "--model", tiny_dir, "--port", str(port)]
    out, err = tmp / "stdout", tmp / "stderr"
    with out.open("w") as o, err.open("w") as e:
        p = subprocess.Popen(
            [*cmd, "--grpc-port", str(gport)], cwd=ROOT, env=env, stdout=o, stderr=e, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "mixserve: serving" not in out.read_text():
            if p.poll() is not None:
                raise AssertionError(f"mixserve serve exited {p.returncode}: {err.read_text()[-3000:]}")
            time.sleep(1)
        assert "mixserve: serving" in out.read_text(), f"mixserve serve did not come up: {err.read_text()[-3000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            assert r.status == 200
        logs = [f.name for f in (tmp / "ray" / "session_latest" / "logs").iterdir()]
        assert "raylet.out" in logs, logs  # the session is the one this test's mixserve started
        modules = [n for n in logs if n.startswith("dashboard_") and not n.startswith("dashboard_agent")]
        assert not modules, f"the local Ray runs dashboard modules: {modules}"
    finally:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def test_mixserve_serve_console_is_the_banner_and_ctrl_c_is_one_line(tmp_path, tiny_dir):
    """What a user sees: the two banner lines (the curl hint carrying the key header when a key is
    set, never the key), one line on Ctrl-C; no Ray or Serve chatter, no traceback. Ctrl-C during
    start-up is one line too, exit code 130."""
    import signal
    import subprocess
    import sys
    import time

    exe = str(Path(sys.executable).with_name("mixserve"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MIXSERVE_API_KEY")}
    port, gport = free_port(), free_port()
    args = [exe, "serve", "--model", tiny_dir, "--port", str(port), "--grpc-port", str(gport), "--api-key", "s3cret"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines = banner(p, timeout_s=180)
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=120)
    lines += [x for x in rest.splitlines() if x.strip()]
    assert p.returncode == 0, lines
    assert lines[0].startswith(f"mixserve: serving {Path(tiny_dir).name} at http://127.0.0.1:{port}/v1"), lines
    assert "Authorization: Bearer <your --api-key>" in lines[1] and "s3cret" not in "\n".join(lines)
    assert lines[2:] == ["mixserve: shutting down"], lines

    p = subprocess.Popen(
        [exe, "serve", "--model", tiny_dir, "--port", str(free_port()), "--grpc-port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    time.sleep(6)  # Ray is starting
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    got = [x for x in out.splitlines() if x.strip()]
    assert p.returncode == 130 and got == ["mixserve: interrupted"], out[-1000:]
