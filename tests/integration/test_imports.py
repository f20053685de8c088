"""What importing a module costs, in a fresh interpreter (a subprocess, so not in the unit tier)."""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_reading_the_config_imports_neither_torch_nor_ray():
    """The schemas are pure pydantic: validating a config file (the CLI's pre-flight, the manifests'
    checks) does not pay for an engine or a cluster."""
    import subprocess
    import sys

    code = (
        "import sys; from cluster.config import load_config; load_config('configs/mini.yaml'); "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=CONFIGS.parent)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_the_serving_modules_do_not_load_the_torch_compiler():
    """The engine, the ingress and the deployments run eagerly: importing them does not load
    torch's inductor stack (~4 s and ~100 MB per process, as llguidance.torch does at import)."""
    import subprocess
    import sys

    code = (
        "import sys, router.engine, cluster.api.ingress, cluster.serve.app, workers.expert; "
        "print(sorted(m for m in ('torch._inductor', 'torch._dynamo') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=CONFIGS.parent)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
