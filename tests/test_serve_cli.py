"""`serve run configs/serve.yaml` (Ray's own CLI) runs the same application."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_config_validates_with_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text()))


def test_serve_run_serves_the_app(tmp_path, tiny_dir):
    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    port, gport = free_port(), free_port()
    cfg["http_options"]["port"] = port
    cfg["grpc_options"]["port"] = gport
    cfg["applications"][0]["args"] = {"config": str(ROOT / "configs" / "tiny.yaml"), "model": tiny_dir,
                                      "server": {"served_model_name": "via-serve-run"}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    serve_bin = Path(sys.executable).with_name("serve")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = json.dumps({"model": "via-serve-run", "prompt": "Hello", "max_tokens": 4}).encode()
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and answer is None:
            assert p.poll() is None, "serve run exited"
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    answer = json.loads(r.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        assert answer is not None, "no answer from serve run within 180 s"
        assert answer["usage"]["completion_tokens"] == 4 and answer["model"] == "via-serve-run"
    finally:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
