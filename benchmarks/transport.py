"""Per-layer dispatch time: one layer's fan-out to the experts and back, for each transport.

    python -m benchmarks.transport [--presets tiny mini] [--tokens 1 32 256] [--iters 30]

Routing is random top-k over the model's experts (as a random gate gives), so a batch of n tokens
sends ~n*k/E rows to each expert. Transports: in-process (no transport, the floor), Ray actor calls,
Serve handles by value (`_by_reference=False`, inter-deployment gRPC), the data plane (authenticated
TCP frames, what the runtime uses) and a Ray Compiled Graph over the same actors. Prints a markdown
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import ray
import torch

from model.moe import route
from model.tiny import preset_config, write_checkpoint
from router.dispatch import ExpertRequest, plan_dispatch
from router.experts import InProcessExperts, expert_groups


def make_requests(cfg, n_tokens: int, count: int) -> list[ExpertRequest]:
    g = torch.Generator().manual_seed(n_tokens)
    reqs = []
    for _ in range(count):
        x = torch.randn(n_tokens, cfg.hidden_size, generator=g).to(cfg.dtype)
        w, ids = route(torch.randn(n_tokens, cfg.num_local_experts, generator=g), cfg.num_experts_per_tok)
        plan = plan_dispatch(w, ids, cfg.num_local_experts)
        reqs.append(ExpertRequest(0, {e: x[r] for e, r in plan.rows.items()}))
    return reqs


def time_backend(submit_and_wait, reqs, warmup: int = 5) -> float:
    for r in reqs[:warmup]:
        submit_and_wait(r)
    ts = []
    for r in reqs[warmup:]:
        t = time.perf_counter()
        submit_and_wait(r)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def bench_preset(preset: str, tokens: list[int], iters: int) -> list[dict]:
    from ray import serve

    from cluster.config import ExpertsConfig
    from cluster.runtime.actors import ExpertActor, RayExperts
    from cluster.serve.experts import ExpertDeployment, ServeExperts

    cfg = preset_config(preset, num_hidden_layers=1)
    d = tempfile.mkdtemp(prefix=f"mixserve-transport-{preset}-")
    write_checkpoint(d, cfg)
    E = cfg.num_local_experts
    groups = expert_groups(E, 1)
    emap = {e: e for e in range(E)}
    results = []

    def in_process():
        local = InProcessExperts(d, groups, "auto")
        return (lambda r: local.submit(r).result()), (lambda: None)

    def actor(transport: str):
        def setup():
            actors = RayExperts(d, groups, "auto", ExpertsConfig(num_cpus=0, transport=transport))
            actors.wait_ready()
            return (lambda r: actors.submit(r).result()), actors.shutdown

        return setup

    def serve_handles():
        apps = [ExpertDeployment.options(name=f"expert-{e}").bind(d, g) for e, g in enumerate(groups)]
        handles = [serve.run(a, name=f"transport-{e}", route_prefix=None) for e, a in enumerate(apps)]
        be = ServeExperts(handles, emap, ExpertsConfig(transport="ray"))
        return (lambda r: be.submit(r).result()), serve.shutdown

    def compiled():
        from ray.dag import InputNode, MultiOutputNode

        from cluster.runtime.channel import new_secret

        cg_actors = [
            ExpertActor.options(num_cpus=0).remote(d, g, "auto", None, new_secret(), ExpertsConfig(num_cpus=0))
            for g in groups
        ]
        with InputNode() as inp:
            dag = MultiOutputNode([a.run_packed.bind(inp[e]) for e, a in enumerate(cg_actors)])
        cdag = dag.experimental_compile(_buffer_size_bytes=8 * 1024 * 1024)

        def call(req: ExpertRequest):
            payloads = [(req.layer, {e: req.batches[e]} if e in req.batches else {}) for e in range(E)]
            out = {}
            for part in ray.get(cdag.execute(*payloads)):
                out.update(part)
            return out

        def stop():
            cdag.teardown()
            for a in cg_actors:
                ray.kill(a)

        return call, stop

    transports = {
        "in-process": in_process,
        "ray actor": actor("ray"),
        "serve handle by value (gRPC)": serve_handles,
        "channel (TCP frames)": actor("channel"),
        "compiled graph": compiled,
    }
    reqs = {n: make_requests(cfg, n, iters + 5) for n in tokens}
    # One transport at a time: compiled-graph workers busy-poll and would slow the others down.
    for name, setup in transports.items():
        fn, stop = setup()
        try:
            for n in tokens:
                ms = time_backend(fn, reqs[n])
                results.append(
                    {"preset": preset, "hidden": cfg.hidden_size, "tokens": n, "transport": name, "ms": round(ms, 3)}
                )
                print(f"  {preset:5s} tokens={n:4d} {name:30s} {ms:8.3f} ms", file=sys.stderr, flush=True)
        finally:
            stop()
    return results


def table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["transport"] for r in rows))
    keys = list(dict.fromkeys((r["preset"], r["hidden"], r["tokens"]) for r in rows))
    ms = {(r["preset"], r["hidden"], r["tokens"], r["transport"]): r["ms"] for r in rows}
    lines = ["| preset (hidden) | tokens | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for p, h, n in keys:
        lines.append(f"| {p} ({h}) | {n} | " + " | ".join(f"{ms[(p, h, n, t)]:.2f}" for t in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "mini"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 32, 256])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results/transport.json")
    a = ap.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    for p in a.presets:
        rows += bench_preset(p, a.tokens, a.iters)
    ray.shutdown()
    import os

    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"unit": "ms per layer (median)", "rows": rows}, f, indent=2)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
