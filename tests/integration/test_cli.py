from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.build import local_engine


def test_generate_local_prints_only_text(tiny_dir):
    from model.sampling import SamplingParams
    from model.tokenizer import Tokenizer

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
    eng = local_engine(tiny_dir, "float32")
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
    assert {p.name for p in (tmp_path / "t").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    }
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


def test_help_imports_neither_torch_nor_ray():
    """`mixserve --help` answers at once: building the parser (bench's included) loads no torch or Ray."""
    code = (
        "import sys; from cluster.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
    bench = subprocess.run(
        [str(Path(sys.executable).with_name("mixserve")), "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bench.returncode == 0 and "--preset" in bench.stdout  # bench's own flags, from its parser


def test_routing_without_a_server_is_one_line_with_the_fix(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = tmp_path / "a.txt"
    text.write_text("some text")
    p = subprocess.run(
        [str(Path(sys.executable).with_name("mixserve")), "routing", str(text), "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "no server at" in p.stderr and "mixserve serve" in p.stderr


@pytest.mark.parametrize(
    "mistake", ["missing folder", "pickle weights", "truncated weights", "port in use", "no cluster at the address"]
)
def test_start_up_mistakes_are_one_line_before_ray_starts(tmp_path, mistake):
    """Each is answered before Ray starts (seconds, not the tens a Ray start costs), exit code 2, one
    line that names the cause and the fix."""
    import socket
    import time

    args, held = ["serve"], None
    if mistake == "missing folder":
        args += ["--model", str(tmp_path / "nope")]
        want = "no such folder"
    elif mistake == "truncated weights":
        exe = str(Path(sys.executable).with_name("mixserve"))
        subprocess.run([exe, "init-tiny", str(tmp_path)], check=True, capture_output=True, timeout=120)
        weights = tmp_path / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 4096)
        args += ["--model", str(tmp_path)]
        want = "not a readable safetensors file"
    elif mistake == "pickle weights":
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
        args += ["--model", str(tmp_path)]
        want = "safetensors"
    elif mistake == "port in use":
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        args += ["--port", str(held.getsockname()[1])]
        want = "--port"
    else:
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            args += ["--ray-address", f"127.0.0.1:{s.getsockname()[1]}"]
        want = "no Ray cluster answers"
    t0 = time.monotonic()
    p = subprocess.run(
        [str(Path(sys.executable).with_name("mixserve")), *args], capture_output=True, text=True, timeout=120
    )
    took = time.monotonic() - t0
    if held:
        held.close()
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and want in p.stderr, p.stderr[-500:]
    assert len(lines) == 1 and lines[0].startswith("mixserve: error:"), p.stderr[-500:]
    assert took < 20, f"{mistake}: answered after {took:.1f} s"  # Ray + Serve + the failing deploy: longer


def test_a_presets_first_use_folder_is_written_with_a_progress_line(tmp_path):
    """configs/mini.yaml names ~/.cache/mixserve/mini: a preset's folder under the cache is written
    on first use (here the tiny preset under a fresh XDG_CACHE_HOME), saying so on stderr."""
    import os

    folder = tmp_path / "mixserve" / "tiny"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    argv = [str(Path(sys.executable).with_name("mixserve")), "generate", "--model", str(folder), "--prompt", "Hi"]
    run = lambda: subprocess.run(
        [*argv, "--max-tokens", "3", "--local"], capture_output=True, text=True, timeout=300, env=env
    )
    p = run()
    assert p.returncode == 0 and p.stdout.strip(), p.stderr[-1000:]
    assert (folder / "config.json").is_file() and "writing the tiny checkpoint" in p.stderr
    again = run()
    assert again.stdout == p.stdout and "writing" not in again.stderr  # written once


def test_only_the_small_presets_are_written_on_first_use(tmp_path, monkeypatch):
    from model.presets import preset_of

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert preset_of(tmp_path / "mixserve" / "mini") == "mini"
    assert preset_of(tmp_path / "mixserve" / "mixtral-8x7b") is None  # ~47B random parameters: never
    assert preset_of(tmp_path / "elsewhere" / "tiny") is None
