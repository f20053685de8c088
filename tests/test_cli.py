from __future__ import annotations

import subprocess
import sys


def test_generate_local_prints_only_text(tiny_dir):
    from model.sampling import SamplingParams
    from model.tokenizer import Tokenizer
    from router.engine import LLMEngine

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster",
            "generate",
            "--local",
            "--model",
            tiny_dir,
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "8",
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    eng = LLMEngine.local(tiny_dir, "float32")
    want = eng.generate(
        [Tokenizer.for_model(tiny_dir).encode("Once upon a time")], SamplingParams(max_tokens=8, temperature=0)
    )[0]
    assert r.stdout == want.text + "\n"
    assert "tokens/s" in r.stderr


def test_init_tiny_writes_a_loadable_checkpoint(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cluster", "init-tiny", str(tmp_path / "t")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "t").iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    from model.checkpoint import Checkpoint

    Checkpoint(tmp_path / "t").check_names()


def test_missing_model_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cluster", "generate", "--local", "--model", str(tmp_path / "no"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "not a directory" in r.stderr and r.stdout == ""


def test_ray_address_is_local_unless_told(monkeypatch):
    """`serve` and `generate` start their own Ray (address "local", which ignores a
    /tmp/ray/ray_current_cluster file) unless --ray-address or RAY_ADDRESS names a cluster."""
    from cluster.cli import build_parser, ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for cmd in (["serve"], ["generate", "--prompt", "x"]):
        p = build_parser()
        assert ray_address(p.parse_args(cmd)) == "local"
        assert ray_address(p.parse_args([*cmd, "--ray-address", "10.0.0.1:6379"])) == "10.0.0.1:6379"
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
        assert ray_address(p.parse_args(cmd)) == "ray://head:10001"
        assert ray_address(p.parse_args([*cmd, "--ray-address", "auto"])) == "auto"
        monkeypatch.delenv("RAY_ADDRESS")
