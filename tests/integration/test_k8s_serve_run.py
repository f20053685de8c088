"""The CPU RayService's serveConfigV2 runs as it is with Ray's own `serve run` (the manifests' offline
checks are in tests/unit/test_k8s.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.support import free_port, serve_run_answer

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"


def serve_config(path: Path) -> dict:
    """The serveConfigV2 that a RayService manifest carries."""
    ray_service = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RayService")
    return yaml.safe_load(ray_service["spec"]["serveConfigV2"])


@pytest.mark.ray
def test_tiny_cpu_serve_config_v2_runs_on_local_ray(tmp_path):
    """`serve run` on the CPU variant's serveConfigV2, unchanged but for the ports and a loopback bind
    address, from a folder outside the checkout with an empty cache (the tiny model gets written)."""
    cfg = serve_config(K8S / "rayservice-tiny-cpu.yaml")
    port, gport = free_port(), free_port()
    cfg["http_options"].update(host="127.0.0.1", port=port)
    cfg["grpc_options"]["port"] = gport
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    answer = serve_run_answer(path, port, {"model": "tiny", "prompt": "Hello", "max_tokens": 4}, tmp_path, env)
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] == 4
    assert (tmp_path / "cache" / "mixserve" / "tiny" / "model.safetensors").is_file()
