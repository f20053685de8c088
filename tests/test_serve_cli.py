"""`serve run configs/serve.yaml` (Ray's own CLI) runs the same application."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, serve_run_answer

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent


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
    answer = serve_run_answer(
        path,
        port,
        {"model": "via-serve-run", "prompt": "Hello", "max_tokens": 4},
        ROOT,
        {**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert answer["usage"]["completion_tokens"] == 4 and answer["model"] == "via-serve-run"
