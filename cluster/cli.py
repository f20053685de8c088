"""The `mixserve` command line (also `python -m cluster`).

Output contract: `generate` prints only the generated text on stdout; logs and figures go to stderr.

Ray: `serve` and `generate` (without --local) start their own local Ray, unless `--ray-address` or
the `RAY_ADDRESS` environment variable names a cluster to join (`host:port`, `ray://host:port`, or
`auto` for the cluster last started on this machine with `ray start`). A `/tmp/ray/ray_current_cluster`
file left behind by a cluster that is gone is not followed. A local Ray started here runs without
Ray's dashboard (its web server and helpers cost ~3% of a core on a small machine, and nothing of
mixserve's needs it) unless `--ray-dashboard` asks for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and any `extra` fields."""

    _std = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))

    def format(self, r: logging.LogRecord) -> str:
        d = {"ts": round(r.created, 3), "level": r.levelname, "logger": r.name, "msg": r.getMessage()}
        d.update({k: v for k, v in vars(r).items() if k not in self._std and k != "message"})
        return json.dumps(d, default=str)


def setup_logging(level: str) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[h], force=True)


def cmd_init_tiny(a) -> int:
    from model.tiny import preset_config, write_checkpoint

    path = write_checkpoint(a.dir, preset_config(a.preset), seed=a.seed, shards=a.shards)
    print(path)
    return 0


def ray_address(a) -> str:
    """The address for `ray.init`: --ray-address, else RAY_ADDRESS, else "local" (a new local Ray;
    `ray.init()` without an address would join whatever /tmp/ray/ray_current_cluster names, and fail
    when that cluster is gone)."""
    return getattr(a, "ray_address", None) or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(a) -> bool:
    """Start or join Ray as `ray_address` says; True when this call initialised it."""
    import ray

    if ray.is_initialized():
        return False
    # A new local cluster has token auth on by default and Ray says so in a warning on every start:
    # that is the intended setting, not a warning (docs/security.md).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    from cluster.config import serve_mode_env

    os.environ.update(serve_mode_env())  # the Serve mode, for the processes of a Ray started here
    ray.init(
        address=ray_address(a),
        log_to_driver=False,
        logging_level=logging.WARNING,
        include_dashboard=bool(getattr(a, "ray_dashboard", False)),  # a local Ray's; a joined cluster keeps its own
    )
    if a.log_level.lower() not in ("debug", "info"):  # Serve's start-up chatter off the console
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return True


def cmd_generate(a) -> int:
    from cluster.build import build_engine, ray_engine
    from model.sampling import SamplingParams

    cfg = resolve_config(a)
    params = SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed
    )
    if a.local:
        engine = build_engine(cfg)
        runtime = None
        started = False
    else:
        started = init_ray(a)
        try:
            engine, runtime = ray_engine(cfg)
        except BaseException:
            if started:
                _ray_shutdown()
            raise
    try:
        prompt = engine.tokenizer.encode(a.prompt)
        t0 = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        dt = time.perf_counter() - t0
    finally:
        if runtime is not None:
            runtime.shutdown()
        if started:
            _ray_shutdown()
    print(out.text)
    print(
        f"# {out.completion_tokens} tokens in {dt:.3f}s = {out.completion_tokens / dt:.1f} tokens/s "
        f"(prompt {out.prompt_tokens} tokens, finish_reason={out.finish_reason})",
        file=sys.stderr,
    )
    return 0


DEVICE_HELP = "cpu or cuda[:N], for attention and experts alike (default: the config's, cpu)"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def resolve_config(a):
    """The YAML config (configs/tiny.yaml by default) with CLI flags applied over it."""
    from cluster.config import load_config

    overrides = {
        "model": getattr(a, "model", None),
        "dtype": None if getattr(a, "dtype", "auto") == "auto" else a.dtype,
        "server.host": getattr(a, "host", None),
        "server.port": getattr(a, "port", None),
        "server.grpc_port": getattr(a, "grpc_port", None),
        "server.served_model_name": getattr(a, "served_model_name", None),
        "server.api_key": getattr(a, "api_key", None),
        "attention.device": getattr(a, "device", None),
        "experts.device": getattr(a, "device", None),
    }
    cfg = load_config(a.config or DEFAULT_CONFIG, overrides)
    from model.tiny import resolve_model

    cfg.model = resolve_model(cfg.model)
    return cfg


GRPC_SERVICER = "cluster.proto.mixserve_pb2_grpc.add_MixServeServicer_to_server"


def grpc_options(cfg) -> dict:
    """Serve's gRPC proxy on server.grpc_port with the mixserve.v1 service."""
    # no reflection: it would list the services to callers without the API key
    return {"port": cfg.server.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER], "enable_reflection": False}


def cmd_serve(a) -> int:
    import signal
    import threading

    if a.model:  # before anything heavy is imported
        check_model_folder(a.model)
    cfg = resolve_config(a)
    preflight(cfg, ray_address(a))

    from ray import serve

    from cluster.serve.app import build_app

    # Serve's gRPC proxy reads its message limit (default 2 GiB) from its environment when it starts:
    # bound it to the request limit. Effective when this command starts Ray; on a running cluster
    # (RAY_ADDRESS, KubeRay) the variable is set where the cluster starts (k8s/ sets it).
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(cfg.server.max_request_bytes))
    started = init_ray(a)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port}, grpc_options=grpc_options(cfg))
        try:
            serve.run(build_app(cfg), name="mixserve", route_prefix="/")
        except RuntimeError as e:  # a deployment failed: its replicas' own error, not Serve's summary
            raise ValueError(f"deploying failed: {root_cause() or e}") from None
        # Ctrl-C during start-up is a KeyboardInterrupt (main prints one line); from here it stops cleanly.
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        name = cfg.server.served_model_name or os.path.basename(os.path.normpath(cfg.model))
        url = f"http://{cfg.server.host}:{cfg.server.port}"
        print(
            f"mixserve: serving {name} at {url}/v1 (gRPC mixserve.v1.MixServe on port {cfg.server.grpc_port})",
            flush=True,
        )
        key = "$MIXSERVE_API_KEY" if os.environ.get("MIXSERVE_API_KEY") == cfg.server.api_key else "<your --api-key>"
        auth = f' -H "Authorization: Bearer {key}"' if cfg.server.api_key else ""  # never the key itself
        print(
            f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
            f'-d \'{{"model": "{name}", "prompt": "Hello", "max_tokens": 16}}\'',
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("mixserve: shutting down", file=sys.stderr, flush=True)
    finally:
        stop_serving(started)
    return 0


def root_cause() -> str | None:
    """The last line of the first failed deployment's message (a replica constructor's exception)."""
    from ray import serve

    try:
        app = serve.status().applications.get("mixserve")
        for name, d in (app.deployments if app else {}).items():
            if d.status in ("UNHEALTHY", "DEPLOY_FAILED"):  # a str enum
                lines = [x.strip() for x in (d.message or "").splitlines() if x.strip()]
                return f"{name}: {lines[-1]}" if lines else None
    except Exception:  # noqa: BLE001 - the summary then
        return None
    return None


def stop_serving(started_ray: bool) -> None:
    """The application deleted (its replicas drain); Ray shut down when this command started it.
    On a cluster it joined, Serve and the other applications stay. (serve.shutdown() would kill the
    controller while its own graceful shutdown runs, which Ray reports as a failed task.)"""
    import ray
    from ray import serve

    try:
        serve.delete("mixserve")
    except Exception:  # noqa: BLE001 - never deployed (start-up failed or was interrupted)
        pass
    if started_ray:
        ray.shutdown()


def check_model_folder(model: str) -> None:
    """A checkpoint folder must exist, unless it is a preset's first-use folder (written when resolved)."""
    from model.presets import preset_of

    if not Path(model).expanduser().is_dir() and preset_of(model) is None:
        raise ValueError(f"--model {model}: no such folder (write a checkpoint with `mixserve init-tiny DIR`)")


def check_ray_address(address: str) -> None:
    """A `host:port` to join must answer (Ray would retry it for a minute and end in a traceback)."""
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError) as e:
        raise ValueError(
            f"no Ray cluster answers at {address} ({getattr(e, 'strerror', None) or e}); fix --ray-address / "
            "RAY_ADDRESS, or leave both unset to start a local Ray"
        ) from None


def preflight(cfg, address: str) -> None:
    """What would otherwise fail only after Ray and Serve started (tens of seconds, the cause buried in
    Ray's logs), checked first: the checkpoint folder, its config and weights (pickle refused, every
    tensor name there), the tokenizer against the config; when this command starts Ray, that the HTTP
    and gRPC ports are free, and when it joins one, that the cluster answers.
    A mistake is a ValueError of one line that names the fix (`main` prints it, exit code 2)."""
    import socket

    from model.checkpoint import Checkpoint
    from model.tokenizer import Tokenizer

    check_model_folder(cfg.model)  # the config's (a preset's is written by now)
    Checkpoint(cfg.model).check_names()
    Tokenizer.for_model(cfg.model)  # its vocabulary against the config's
    if address != "local":  # joining: the cluster must answer; its Serve proxies hold the ports already
        check_ray_address(address)
        return
    s = cfg.server
    for port, flag in ((s.port, "--port"), (s.grpc_port, "--grpc-port")):
        with socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET) as sock:
            try:
                sock.bind((s.host if flag == "--port" else "0.0.0.0", port))
            except OSError as e:
                raise ValueError(f"port {port} is in use ({e.strerror}); choose another with {flag}") from None


RAY_DASHBOARD_HELP = "start Ray's dashboard (http://127.0.0.1:8265) with the local Ray started here"
RAY_ADDRESS_HELP = (
    "Ray cluster to join (host:port, ray://host:port, or 'auto' for the one `ray start` last started "
    "here); default: RAY_ADDRESS, else start a local Ray"
)


def _ray_shutdown() -> None:
    import ray

    ray.shutdown()


ENVIRONMENT = """environment:
  MIXSERVE_API_KEY    the API key (as --api-key) for serve and routing
  RAY_ADDRESS         a Ray cluster to join instead of starting a local one (as --ray-address)
  MIXSERVE_LOG_LEVEL  as --log-level
  XDG_CACHE_HOME      where the presets' checkpoints are written on first use (~/.cache/mixserve/<preset>)
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where the help text states its own (and never a key's value)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return h
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = argparse.ArgumentParser(
        prog="mixserve",
        description="Serve Mixtral-architecture MoE models on Ray.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("MIXSERVE_LOG_LEVEL", "warning"),
        help="debug, info, warning or error (structured JSON lines on stderr)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="as --log-level info, Serve's own lines included")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "init-tiny", help="write the built-in tiny checkpoint (HF layout + tokenizer.model)", formatter_class=fmt
    )
    s.add_argument("dir", help="the folder to write")
    s.add_argument("--preset", default="tiny", choices=["tiny", "mini"], help="model shape")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    s.add_argument("--shards", type=int, default=1, help="safetensors files (with an index when more than 1)")
    s.set_defaults(fn=cmd_init_tiny)

    s = sub.add_parser("generate", help="generate a continuation of a prompt", formatter_class=fmt)
    s.add_argument("--model", help="checkpoint folder (default: the embedded tiny model)")
    s.add_argument("--prompt", required=True, help="the text to continue")
    s.add_argument("--config", help="mixserve YAML config (engine and expert settings; default configs/tiny.yaml)")
    s.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most")
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--top-k", type=int, default=0, help="0 is off")
    s.add_argument("--seed", type=int, default=None, help="sampling seed")
    s.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="weights and compute (auto: the checkpoint's)"
    )
    s.add_argument("--device", help=DEVICE_HELP)
    s.add_argument("--local", action="store_true", help="run in one process, without Ray")
    s.add_argument("--ray-address", help=RAY_ADDRESS_HELP)
    s.add_argument("--ray-dashboard", action="store_true", help=RAY_DASHBOARD_HELP)
    s.set_defaults(fn=cmd_generate, config=None)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve", formatter_class=fmt)
    s.add_argument("--config", help="YAML config (default: configs/tiny.yaml)")
    s.add_argument("--model", help="checkpoint folder (default: the config's, else the embedded tiny model)")
    s.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weights and compute (auto: the config's, else the checkpoint's)",
    )
    s.add_argument("--device", help=DEVICE_HELP)
    s.add_argument("--host", help="HTTP bind address (default: the config's, 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (default: the config's, 8000)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default: the config's, 9000)")
    s.add_argument("--served-model-name", help="the model id in the API (default: the checkpoint folder's name)")
    s.add_argument(
        "--api-key",
        default=os.environ.get("MIXSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on HTTP and gRPC (default: $MIXSERVE_API_KEY, else none)",
    )
    s.add_argument("--ray-address", help=RAY_ADDRESS_HELP)
    s.add_argument("--ray-dashboard", action="store_true", help=RAY_DASHBOARD_HELP)
    s.set_defaults(fn=cmd_serve)
    # The client-side tools live in benchmarks/ and run as their own process (`python -m`), so the
    # CLI imports none of them and `mixserve --help` loads no torch or Ray; each parses its own flags.
    for name, (_, what) in TOOLS.items():
        s = sub.add_parser(name, help=what, add_help=False)
        s.set_defaults(fn=cmd_tool, tool=name)
    return p


TOOLS = {
    "routing": ("benchmarks.routing", "the Mixtral paper's routing analysis of text files through a running server"),
    "bench": ("benchmarks.bench", "benchmark HF transformers, in-process, disaggregated and HTTP side by side"),
}


def cmd_tool(a) -> int:
    """`mixserve routing|bench ARGS` = `python -m benchmarks.<tool> ARGS` (its exit status)."""
    import subprocess

    try:
        return subprocess.call([sys.executable, "-m", TOOLS[a.tool][0], *a.rest])
    except KeyboardInterrupt:  # the tool got the same Ctrl-C and has stopped
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, rest = parser.parse_known_args(argv)
    if getattr(a, "verbose", False):
        a.log_level = "info"
    if getattr(a, "fn", None) is cmd_tool:
        a.rest = rest  # the tool's own parser reads them
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(a.log_level)
    from cluster.config import THREAD_ENV

    for k, v in THREAD_ENV.items():  # before anything loads torch here or in a tool's process
        os.environ.setdefault(k, v)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"mixserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixserve: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Ray's teardown of a cluster interrupted while it starts can crash the interpreter's exit;
        # Ray's own processes share this one's fate (they go with it), so nothing is left behind.
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
