"""The README's "Use it" section runs as written: its `mixserve` commands and its Python snippet, on
free ports instead of 8000/8001/9000 (the only change). `serve run configs/serve.yaml` is left to
tests/test_serve_cli.py, which runs the same command."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support import banner, free_port

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def use_it() -> tuple[list[list[str]], str]:
    """The section's shell commands (as argv, comments cut) and its Python snippet."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it") :]
    section = section[: section.index("\n## ", 3)]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cmds = [shlex.split(line.split("  #")[0]) for line in shell.splitlines() if line.strip()]
    return cmds, python


def env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MIXSERVE_API_KEY")}


def start(argv: list[str]) -> subprocess.Popen:
    """Run a README command from the checkout (its `.venv/bin/` is this interpreter's folder) and
    wait for its banner."""
    argv = [str(BIN / Path(argv[0]).name), *argv[1:]]
    p = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner(p)
    return p


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=120)
    assert p.returncode == 0


def with_ports(argv: list[str], port: int, grpc_port: int) -> list[str]:
    argv = list(argv)
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    return argv + ["--grpc-port", str(grpc_port)]


def test_the_default_server_and_the_python_snippet():
    cmds, python = use_it()
    serve = next(c for c in cmds if c[1:] == ["serve"])
    port = free_port()
    p = start(with_ports(serve, port, free_port()))
    try:
        snippet = python.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        assert snippet != python  # the snippet talks to the default server
        out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, env=env())
        assert out.returncode == 0, out.stderr[-2000:]
        assert "ChatCompletion(" in out.stdout and len(out.stdout.strip()) > 40
    finally:
        stop(p)


def test_the_mini_server_with_a_key():
    cmds, _ = use_it()
    mini = next(c for c in cmds if "--config" in c and "configs/mini.yaml" in c)
    key = mini[mini.index("--api-key") + 1]
    port = free_port()
    p = start(with_ports(mini, port, free_port()))  # writes ~/.cache/mixserve/mini on first use
    try:
        body = json.dumps({"model": "mini", "prompt": "Hello", "max_tokens": 4}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 4
    finally:
        stop(p)


def test_generate_local_as_written():
    cmds, _ = use_it()
    gen = next(c for c in cmds if c[1:2] == ["generate"])
    out = subprocess.run(
        [str(BIN / Path(gen[0]).name), *[os.path.expanduser(x) for x in gen[1:]]],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
