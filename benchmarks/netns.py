"""Several hosts on one machine: each a Linux network namespace with its own address on a private
bridge made for it, Ray started in each, the Serve application deployed across them.

    root namespace: bridge msn<id> 10.<a>.<b>.1/24 (the test process, the OpenAI client)
      |-- msn<id>-h0  head       10.<a>.<b>.2  ray start --head; Serve controller, proxy, ingress, directory
      |-- msn<id>-at  attention  10.<a>.<b>.3  ray start --address; {attention_slot}
      |-- msn<id>-x1  expert     10.<a>.<b>.4  ray start --address; {expert_slot}; through the wire
      `-- msn<id>-x2  expert     ...

Every host has its own Ray temp dir (`--temp-dir`), so raylets of one cluster on one filesystem do not
collide on their socket paths; the deploying driver runs in the head's namespace, where Ray expects a
driver. Ray's token authentication is on: every host gets RAY_AUTH_MODE=token and one RAY_AUTH_TOKEN.
Faults are made on a host's own link: delay and loss by the wire (a process copying the frames between
the host's veth and its bridge port, since netem is not built into every kernel), a partition by taking
the link down; or the host goes for good: every process in its namespace is killed. Only addresses
this module creates are used; `close()` removes all of it.

By hand (as root):

    python -m benchmarks.netns up [--experts 2] [--model DIR]   # prints the URL; Ctrl-C tears it all down
    python -m benchmarks.netns clean                          # removes what a killed run left behind
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PREFIX = "msn"  # every namespace, bridge and veth this module makes starts with it
DATA_PORTS = (20000, 20063)  # the data plane's port range (experts.channel_ports)
GCS_PORT = 6379
HTTP_PORT = 8000
BIN = Path(sys.executable).parent


def _run(argv: list[str], check: bool = True, timeout: float = 120, env: dict | None = None, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {r.returncode}: {(r.stderr or r.stdout).strip()[-2000:]}")
    return r


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can): root, ip, tc and ss, and a probe."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "ss"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _run(["ip", "netns", "exec", probe, "ip", "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
            _run(["ip", "netns", "exec", probe, sys.executable, "-c", PACKET_PROBE])
        finally:
            _run(["ip", "netns", "del", probe], check=False)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot make a network namespace with a veth and a packet socket here: {e}"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no address or route of this machine touches."""
    used = []
    for what in ("addr", "route"):
        out = _run(["ip", "-4", "-j", what, "show"]).stdout or "[]"
        for item in json.loads(out):
            for a in item.get("addr_info", []):
                used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
            dst = item.get("dst")
            if dst and dst != "default":
                used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    nets = list(ipaddress.ip_network("10.200.0.0/13").subnets(new_prefix=24))
    start = secrets.randbelow(len(nets))
    for net in nets[start:] + nets[:start]:
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free /24 in 10.200.0.0/13")


PACKET_PROBE = "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).bind(('p0', 0))"
SIOCETHTOOL = 0x8946
# ethtool's legacy set commands: tx checksum, scatter-gather, TSO, GSO, GRO. The wire copies frames as they
# are; with these on, a veth hands it unfinished checksums and 64 KiB segments that no receiver accepts.
OFFLOADS = (0x17, 0x19, 0x1F, 0x24, 0x2C)


def no_offloads(*ifnames: str) -> None:
    """Turn the offloads off on interfaces of this process's network namespace (ethtool -K ... off)."""
    import ctypes
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in ifnames:
            for cmd in OFFLOADS:
                value = ctypes.create_string_buffer(struct.pack("II", cmd, 0))
                ifr = struct.pack("16sP", name.encode(), ctypes.addressof(value)).ljust(40, b"\0")
                try:
                    fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
                except OSError:
                    pass  # a feature the device cannot change is off already


@dataclass
class Host:
    name: str  # short: h0, at, x1, ...
    ns: str  # its network namespace
    ip: str
    links: list[str]  # its interfaces in the root namespace (the host's own end is eth0)
    wired: bool = False  # its link runs through the wire (delay, loss)
    resources: dict = field(default_factory=dict)
    alive: bool = True


class Wire:
    """A link emulator in a process of its own: it copies Ethernet frames between a host's veth and its
    bridge port (packet sockets in the root namespace), delaying what the host sends by `delay_ms` and
    dropping `loss_pct` % of the frames each way. The kernel's netem does this too, where it is built
    (it is not in every kernel, e.g. this project's CI machines); this needs only packet sockets."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.netns", "wire"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(Path(__file__).resolve().parent.parent),
            start_new_session=True,  # a Ctrl-C for the harness must not take the links down before teardown
        )

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the wire process exited ({self.proc.poll()})")
        got = json.loads(line)
        if "error" in got:
            raise RuntimeError(f"wire: {got['error']}")
        return got

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _wire_main() -> int:
    """The wire process: commands on stdin (one JSON object a line), one JSON answer each on stdout."""
    import collections
    import random
    import select
    import socket

    links: dict[str, dict] = {}
    by_fd: dict[int, tuple[dict, bool]] = {}  # fd -> (link, from the host side)

    def open_sock(ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((ifname, 0))
        s.setblocking(False)
        return s

    def send(sock: socket.socket, frame: bytes) -> None:
        try:
            sock.send(frame)
        except OSError:
            pass  # a full queue or a link that is down: the frame is lost, as on a wire

    inputs = [sys.stdin]
    while True:
        now = time.monotonic()
        due = [l["queue"][0][0] for l in links.values() if l["queue"]]
        timeout = max(0.0, min(due) - now) if due else None
        ready, _, _ = select.select(inputs, [], [], timeout)
        for r in ready:
            if r is sys.stdin:
                line = sys.stdin.readline()
                if not line:
                    return 0
                cmd = json.loads(line)
                try:
                    op = cmd.pop("op")
                    if op == "add":
                        host, bridge = open_sock(cmd["host_if"]), open_sock(cmd["bridge_if"])
                        link = dict(host=host, bridge=bridge, delay=0.0, loss=0.0, queue=collections.deque(), dropped=0)
                        links[cmd["name"]] = link
                        by_fd[host.fileno()], by_fd[bridge.fileno()] = (link, True), (link, False)
                        inputs += [host, bridge]
                    elif op == "set":
                        link = links[cmd["name"]]
                        link["delay"], link["loss"] = cmd["delay_ms"] / 1000, cmd["loss_pct"] / 100
                    elif op == "stats":
                        pass
                    elif op == "remove":
                        link = links.pop(cmd["name"])
                        for s in (link["host"], link["bridge"]):
                            inputs.remove(s)
                            by_fd.pop(s.fileno())
                            s.close()
                    else:
                        raise ValueError(f"unknown op {op!r}")
                    answer = {"dropped": {k: v["dropped"] for k, v in links.items()}}
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    answer = {"error": f"{type(e).__name__}: {e}"}
                sys.stdout.write(json.dumps(answer) + "\n")
                sys.stdout.flush()
                continue
            link, from_host = by_fd[r.fileno()]
            while True:
                try:
                    frame, addr = r.recvfrom(65536)
                except BlockingIOError:
                    break
                except OSError:
                    break  # the interface went away
                if addr[2] == socket.PACKET_OUTGOING:
                    continue  # what this process sent itself
                if link["loss"] and random.random() < link["loss"]:
                    link["dropped"] += 1
                    continue
                if not from_host:
                    send(link["host"], frame)
                elif link["delay"]:
                    link["queue"].append((time.monotonic() + link["delay"], frame))
                else:
                    send(link["bridge"], frame)
        now = time.monotonic()
        for link in links.values():
            q = link["queue"]
            while q and q[0][0] <= now:
                send(link["bridge"], q.popleft()[1])


class NetCluster:
    """Hosts in network namespaces on one private bridge, with Ray in each. Use as a context manager
    (or call close()): everything it made goes, also when the body raises."""

    def __init__(self, workdir: str | None = None):
        self.id = secrets.token_hex(2)
        self.bridge = f"{PREFIX}{self.id}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.bridge}-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.hosts: dict[str, Host] = {}
        self.net = _free_subnet()
        self._addrs = iter(list(self.net.hosts())[1:])
        self.gateway = str(next(self.net.hosts()))
        self.head: Host | None = None
        self.wire: Wire | None = None
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        # A bridge takes the lowest MAC of its ports unless given one: hosts leaving and joining would
        # change it, and the hosts' ARP entries for this address would point nowhere for a minute.
        mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
        _run(["ip", "link", "set", self.bridge, "address", mac])
        _run(["ip", "addr", "add", f"{self.gateway}/{self.net.prefixlen}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        no_offloads(self.bridge)

    # ---- hosts

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _make_host(self, name: str, wired: bool) -> Host:
        """A namespace with eth0 at a new address: a veth to the bridge, or through the wire (a veth to
        the wire, which copies frames to a second veth on the bridge)."""
        ns, ip, base = f"{self.bridge}-{name}", str(next(self._addrs)), f"{self.bridge}-{name}"
        _run(["ip", "netns", "add", ns])
        h = Host(name, ns, ip, [], wired)
        self.hosts[name] = h
        if not wired:
            h.links = [base]
            _run(["ip", "link", "add", base, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "link", "set", base, "master", self.bridge, "up"])
        else:
            hside, wside, bport = f"{base}h", f"{base}w", f"{base}b"
            h.links = [hside, wside, bport]
            _run(["ip", "link", "add", hside, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "link", "add", wside, "type", "veth", "peer", "name", bport])
            _run(["ip", "link", "set", bport, "master", self.bridge])
            for i in h.links:
                _run(["sysctl", "-qw", f"net.ipv6.conf.{i}.disable_ipv6=1"], check=False)
                _run(["ip", "link", "set", i, "up"])
            no_offloads(*h.links)
            if self.wire is None:
                self.wire = Wire()
            self.wire.ask(op="add", name=name, host_if=hside, bridge_if=wside)
        self.exec(h, "ip", "addr", "add", f"{ip}/{self.net.prefixlen}", "dev", "eth0")
        self.exec(h, "ip", "link", "set", "eth0", "up")
        self.exec(h, "ip", "link", "set", "lo", "up")
        offloads = "from benchmarks.netns import no_offloads; no_offloads('eth0')"
        self.exec(h, sys.executable, "-c", offloads, env=self.env())
        return h

    def exec(self, host: Host, *argv: str, check: bool = True, timeout: float = 120, env: dict | None = None):
        return _run(["ip", "netns", "exec", host.ns, *argv], check=check, timeout=timeout, env=env)

    def _ray_start(self, h: Host, extra: list[str], num_cpus: int) -> None:
        argv = [
            str(BIN / "ray"),
            "start",
            *extra,
            f"--node-ip-address={h.ip}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(h.resources)}",
            f"--temp-dir={self.workdir / h.name}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]
        with open(self.workdir / f"{h.name}.log", "w") as log:
            r = subprocess.run(
                ["ip", "netns", "exec", h.ns, *argv], stdout=log, stderr=subprocess.STDOUT, env=self.env(), timeout=180
            )
        if r.returncode != 0:
            tail = (self.workdir / f"{h.name}.log").read_text()[-2000:]
            raise RuntimeError(f"ray start on {h.name} ({h.ip}) failed:\n{tail}")

    def start_head(self, resources: dict | None = None, num_cpus: int = 1) -> Host:
        h = self._make_host("h0", wired=False)
        h.resources = dict(resources or {})
        self._ray_start(h, ["--head", f"--port={GCS_PORT}", "--include-dashboard=false"], num_cpus)
        self.head = h
        return h

    def add_host(self, name: str, resources: dict, num_cpus: int = 1, wired: bool = False) -> Host:
        """A new host that joins the cluster (`ray start --address` the head); `wired`: its link runs
        through the wire, so that delay and loss can be put on it."""
        assert self.head is not None, "start_head() first"
        h = self._make_host(name, wired)
        h.resources = dict(resources)
        self._ray_start(h, [f"--address={self.head.ip}:{GCS_PORT}"], num_cpus)
        return h

    def remove(self, h: Host) -> None:
        """The host goes away for good: every process in its namespace is killed, then the namespace."""
        for _ in range(3):
            pids = _run(["ip", "netns", "pids", h.ns], check=False).stdout.split()
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(0.2)
        if h.wired and self.wire is not None and self.wire.proc.poll() is None:
            self.wire.ask(op="remove", name=h.name)
        _run(["ip", "netns", "del", h.ns], check=False)
        for i in h.links:
            _run(["ip", "link", "del", i], check=False)  # a veth's peer goes with it
        h.alive = False

    # ---- faults on a host's link

    def impair(self, h: Host, delay_ms: float = 0, loss_pct: float = 0) -> None:
        """Delay every frame the host sends by `delay_ms` (so each round trip through its link takes that
        much longer) and drop `loss_pct` % of the frames each way; 0, 0 = a clean link again."""
        assert h.wired, f"{h.name} was not added with wired=True"
        self.wire.ask(op="set", name=h.name, delay_ms=delay_ms, loss_pct=loss_pct)

    def dropped(self, h: Host) -> int:
        """Frames the wire dropped on the host's link so far."""
        return self.wire.ask(op="stats")["dropped"][h.name]

    def link(self, h: Host, up: bool) -> None:
        """A partition (down) and its end (up): the host's link to the bridge."""
        self.exec(h, "ip", "link", "set", "eth0", "up" if up else "down")

    # ---- what the data plane does on a host

    def listeners(self, h: Host) -> list[int]:
        """Data-plane ports listening on the host (one per expert replica there)."""
        out = self.exec(h, "ss", "-tlnH", f"( sport >= :{DATA_PORTS[0]} and sport <= :{DATA_PORTS[1]} )").stdout
        return sorted(int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip())

    def data_bytes(self, h: Host) -> dict[str, int]:
        """Bytes received so far on each established data-plane connection of the host."""
        out = self.exec(
            h, "ss", "-tinH", "state", "established", f"( sport >= :{DATA_PORTS[0]} and sport <= :{DATA_PORTS[1]} )"
        ).stdout
        got, key = {}, None
        for line in out.splitlines():
            if not line.startswith((" ", "\t")):
                parts = line.split()
                key = f"{parts[2]}<-{parts[3]}" if len(parts) >= 4 else None
            else:
                m = re.search(r"bytes_received:(\d+)", line)
                if key and m:
                    got[key] = int(m.group(1))
        return got

    # ---- the application

    def deploy(self, cfg: dict, timeout_s: float = 420) -> str:
        """Deploy the Serve application of `cfg` (a mixserve config) from a driver in the head's namespace;
        Serve's HTTP proxy listens on the head's address only. Returns the OpenAI base URL."""
        assert self.head is not None
        path = self.workdir / "app.yaml"
        path.write_text(yaml.safe_dump(cfg))
        h = self.head
        argv = [sys.executable, "-m", "benchmarks.netns", "deploy", f"{h.ip}:{GCS_PORT}", str(path), h.ip]
        with open(self.workdir / "deploy.log", "w") as log:
            r = subprocess.run(
                ["ip", "netns", "exec", h.ns, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                timeout=timeout_s,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        if r.returncode != 0:
            raise RuntimeError(f"deploy failed:\n{(self.workdir / 'deploy.log').read_text()[-3000:]}")
        return f"http://{h.ip}:{HTTP_PORT}/v1"

    def logs(self, chars: int = 3000) -> str:
        """The tail of each host's `ray start` output and the deploy log (for a failure message)."""
        out = []
        for p in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {p.name}\n{p.read_text()[-chars:]}")
        return "\n".join(out)

    # ---- teardown

    def close(self) -> None:
        for h in list(self.hosts.values()):
            if h.alive:
                self.remove(h)
        if self.wire is not None:
            self.wire.close()
        _run(["ip", "link", "del", self.bridge], check=False)
        if not os.environ.get("MIXSERVE_NETNS_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def clean() -> list[str]:
    """Remove namespaces and bridges of this module that a killed run left behind."""
    gone = []
    for line in _run(["ip", "netns", "list"]).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if re.fullmatch(rf"{PREFIX}[0-9a-f]{{4}}-\w+", ns):
            for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", ns], check=False)
            gone.append(ns)
    for item in json.loads(_run(["ip", "-j", "link", "show"]).stdout or "[]"):
        if re.fullmatch(rf"{PREFIX}[0-9a-f]{{4}}(-\w+)?", item["ifname"]):
            _run(["ip", "link", "del", item["ifname"]], check=False)
            gone.append(item["ifname"])
    return gone


# ---------------------------------------------------------------- the application on such a cluster


def app_config(model: str, replicas: int = 2, call_timeout_s: float = 2.0) -> dict:
    """The mixserve config for a NetCluster: ingress and directory on the head, the attention replica
    on the attention host, each expert group `replicas` times over the expert hosts (one per host)."""
    return {
        "model": model,
        "dtype": "float32",
        # metrics_refresh_s 0: benchmarks/network.py reads /metrics' counters right before and after a run
        "server": {
            "served_model_name": "tiny",
            "resources": {"ingress_slot": 1},
            "port": HTTP_PORT,
            "metrics_refresh_s": 0,
        },
        "attention": {"replicas": 1, "num_cpus": 0, "num_threads": 1, "resources": {"attention_slot": 1}},
        "experts": {
            "experts_per_worker": 4,
            "replicas": replicas,
            "num_cpus": 0,
            "num_threads": 1,
            "resources": {"expert_slot": 1},
            "call_timeout_s": call_timeout_s,
            "max_tries": 8,
            "channel_ports": list(DATA_PORTS),
        },
    }


def build(model: str, expert_hosts: int = 2, call_timeout_s: float = 2.0) -> tuple[NetCluster, str]:
    """A head, an attention host and `expert_hosts` expert hosts, with the application deployed."""
    c = NetCluster()
    try:
        c.start_head({"ingress_slot": 2})
        c.add_host("at", {"attention_slot": 2})
        for i in range(expert_hosts):
            c.add_host(f"x{i + 1}", {"expert_slot": 4}, wired=True)
        url = c.deploy(app_config(model, min(2, expert_hosts), call_timeout_s))
    except BaseException:
        c.close()
        raise
    return c, url


def _deploy(address: str, cfg_path: str, http_host: str) -> int:
    """The driver (run in the head's namespace): start Serve with its proxy on the head, deploy, leave."""
    import ray
    from ray import serve

    from cluster.config import load_config
    from cluster.serve.app import build_app

    ray.init(address=address, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": http_host, "port": HTTP_PORT})
    serve.run(build_app(load_config(cfg_path)), name="mixserve", route_prefix="/")
    print("deployed", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.netns", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("up", help="build the hosts, deploy the application, wait for Ctrl-C")
    s.add_argument("--experts", type=int, default=2, help="expert hosts")
    s.add_argument("--model", help="checkpoint folder (default: the embedded tiny model)")
    sub.add_parser("clean", help="remove namespaces and bridges left by a killed run")
    sub.add_parser("wire", help=argparse.SUPPRESS)
    s = sub.add_parser("deploy", help=argparse.SUPPRESS)
    s.add_argument("address")
    s.add_argument("config")
    s.add_argument("http_host")
    a = p.parse_args(argv)
    if a.cmd == "deploy":
        return _deploy(a.address, a.config, a.http_host)
    if a.cmd == "wire":
        return _wire_main()
    if (why := unavailable()) is not None:
        print(f"netns: {why}", file=sys.stderr)
        return 2
    if a.cmd == "clean":
        print("removed:", " ".join(clean()) or "nothing")
        return 0
    import threading

    from model.tiny import resolve_model

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    c, url = build(resolve_model(a.model), a.experts)
    try:
        print(f"serving at {url} (model 'tiny'); hosts:")
        for h in c.hosts.values():
            print(f"  {h.name:3} {h.ip:15} netns {h.ns}  resources {h.resources}")
        print(f"a partition: ip netns exec {c.hosts['x1'].ns} ip link set eth0 down")
        print("Ctrl-C tears everything down", flush=True)
        stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not stop the teardown half-way
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
