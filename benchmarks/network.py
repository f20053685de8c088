"""What latency between attention and expert hosts costs: the application across network namespaces
(benchmarks/netns.py: a head, an attention host, expert hosts on a private bridge), with 0, 5 and 20 ms
added to every round trip through the expert hosts' links; for each, the per-layer expert round trip
the attention replica sees (from /metrics) and the output tokens/s of a closed loop of OpenAI clients.

    sudo .venv/bin/python -m benchmarks.network [--delays 0 5 20] [--concurrency 8] [--requests 48]

Needs root (network namespaces). Writes benchmarks/results/network.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.load import PROMPTS, client


def expert_calls(base_url: str) -> tuple[float, float]:
    """(layer fan-outs so far, their summed round-trip seconds) from the ingress's /metrics."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the bridge, never a proxy
    text = direct.open(base_url.removesuffix("/v1") + "/metrics", timeout=30).read().decode()
    got = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("mixserve_expert_layer_calls_total", "mixserve_expert_layer_call_seconds_total"):
            got[name] = float(value)
    return got["mixserve_expert_layer_calls_total"], got["mixserve_expert_layer_call_seconds_total"]


def measure(base_url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """A closed loop of `concurrency` OpenAI clients sending `requests` greedy completions in all.
    Returns tokens/s, the mean per-layer expert round trip over the run, and each request's text
    (request i has prompt i % len(PROMPTS))."""
    api = client(base_url, timeout_s=300)

    def one(i: int):
        r = api.completions.create(
            model=model,
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text, r.usage.completion_tokens

    n0, s0 = expert_calls(base_url)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    n1, s1 = expert_calls(base_url)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "output_tokens": sum(n for _, n in outs),
        "seconds": round(wall, 3),
        "output_tok_per_s": round(sum(n for _, n in outs) / wall, 2),
        "layer_round_trip_ms": round(1000 * (s1 - s0) / max(n1 - n0, 1), 3),
        "layer_calls": int(n1 - n0),
        "texts": [t for t, _ in outs],
    }


def sweep(cluster, base_url: str, delays, concurrency: int, requests: int, max_tokens: int) -> list[dict]:
    """`measure` with each added delay on every expert host's link (the wire), then the links clean."""
    experts = [h for h in cluster.hosts.values() if h.wired and h.alive]
    rows = []
    try:
        for d in delays:
            for h in experts:
                cluster.impair(h, delay_ms=d)
            row = measure(base_url, "tiny", concurrency, requests, max_tokens)
            rows.append({"added_delay_ms": d, **row})
            print(
                f"  +{d} ms: {row['output_tok_per_s']} tok/s, layer round trip {row['layer_round_trip_ms']} ms",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for h in experts:
            cluster.impair(h)
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]
    out = [
        "| added delay ms | layer round trip ms | output tok/s | tok/s vs +0 ms |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["output_tok_per_s"] / base["output_tok_per_s"]
        out.append(
            f"| {r['added_delay_ms']} | {r['layer_round_trip_ms']:.2f} | {r['output_tok_per_s']:.1f} | {ratio:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.netns import build, unavailable
    from model.tiny import resolve_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.network", description=__doc__.split("\n\n")[0])
    p.add_argument("--delays", type=float, nargs="+", default=[0, 5, 20])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", help="checkpoint (default: the embedded tiny model)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "network.json"))
    a = p.parse_args(argv)
    if (why := unavailable()) is not None:
        print(f"benchmarks.network: {why}", file=sys.stderr)
        return 2
    print("building the hosts and deploying ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    cluster, url = build(resolve_model(a.model))
    with cluster:
        print(f"up in {time.perf_counter() - t:.0f} s at {url}; warming up", file=sys.stderr, flush=True)
        measure(url, "tiny", a.concurrency, a.concurrency, a.max_tokens)
        rows = sweep(cluster, url, a.delays, a.concurrency, a.requests, a.max_tokens)
    same = all(r["texts"] == rows[0]["texts"] for r in rows)
    for r in rows:
        del r["texts"]
    report = {
        "command": "python -m benchmarks.network " + " ".join(argv if argv is not None else sys.argv[1:]),
        "layout": "head (ingress), attention host (1 replica), 2 expert hosts (2 groups x 2 replicas)",
        "outputs_identical_across_delays": same,
        "rows": rows,
    }
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(table(rows))
    print(f"outputs identical across delays: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
