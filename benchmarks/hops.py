"""What each hop of the served path costs, per request and per streamed token.

    python -m benchmarks.hops [--preset tiny] [--dtype float32] [--tokens 48] [--requests 12]

One request at a time (c=1), greedy, fixed output length, the same prompt through three entry points
of one deployed application, and the engine alone:

    engine        LLMEngine in this process, experts in-process (no Ray)
    experts       the same engine with its experts as Ray actors over the data plane (`RayExperts`)
    attention     a streaming handle call to the AttentionWorker (engine + expert replicas over the data plane)
    http          POST /v1/completions, stream=True, through Serve's HTTP proxy and the OpenAI ingress

Differences between rows are the cost of a hop: time to first token (per request) and the median gap
between streamed outputs (per token). A small model (`tiny`) makes the hops, not the compute, show.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time

from model.sampling import SamplingParams
from model.tiny import preset_config, write_checkpoint


def timed(stream_fn, n: int) -> tuple[list[float], list[float]]:
    """(TTFT ms per request, gaps between outputs in ms) over n sequential requests (after 2 warm-ups)."""
    ttft, gaps = [], []
    for i in range(n + 2):
        t0 = time.perf_counter()
        times = [time.perf_counter() for _ in stream_fn()]
        if i >= 2 and times:
            ttft.append((times[0] - t0) * 1e3)
            gaps += [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    return ttft, gaps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "mini"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/hops.json")
    a = ap.parse_args(argv)

    import ray
    from ray import serve

    from benchmarks.bench import free_port
    from cluster.build import local_engine, ray_engine
    from cluster.config import AppConfig, ExpertsConfig
    from cluster.serve.app import build_app

    d = tempfile.mkdtemp(prefix=f"mixserve-hops-{a.preset}-")
    write_checkpoint(d, preset_config(a.preset))
    params = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    prompt = [1] + list(range(100, 131))
    rows = {}

    def report(name, ttft, gaps):
        rows[name] = {
            "ttft_ms_p50": round(statistics.median(ttft), 2),
            "gap_ms_p50": round(statistics.median(gaps), 3),
            "outputs_per_request": round(len(gaps) / len(ttft) + 1, 1),
        }
        print(
            f"[hops] {name:10s} TTFT p50 {rows[name]['ttft_ms_p50']:8.2f} ms   "
            f"gap p50 {rows[name]['gap_ms_p50']:7.3f} ms",
            file=sys.stderr,
            flush=True,
        )

    eng = local_engine(d, a.dtype)

    def engine_stream(e=eng):
        rid = e.add_request(prompt, params)
        while e.has_unfinished():
            for o in e.step():
                if o.req_id == rid:
                    yield o

    report("engine", *timed(engine_stream, a.requests))
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        deng, rt = ray_engine(
            AppConfig(model=d, dtype=a.dtype, experts=ExpertsConfig(num_cpus=0, experts_per_worker=2))
        )
        report("experts", *timed(lambda: engine_stream(deng), a.requests))
        rt.experts.shutdown()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = AppConfig(
            model=d,
            dtype=a.dtype,
            attention={"num_cpus": 0},
            experts={"num_cpus": 0, "experts_per_worker": 2},
            server={"served_model_name": "hops"},
        )
        serve.run(build_app(cfg), name="hops", route_prefix="/")
        time.sleep(2)  # the attention replica has read the expert directory
        attn = serve.get_deployment_handle("AttentionWorker", app_name="hops")
        report("attention", *timed(lambda: attn.options(stream=True).generate.remote(prompt, params), a.requests))

        def http_stream():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            body = json.dumps(
                {
                    "model": "hops",
                    "prompt": prompt,
                    "max_tokens": a.tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                }
            )
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            for line in conn.getresponse():
                if line.startswith(b"data: {") and b'"text"' in line:
                    yield line

        report("http", *timed(http_stream, a.requests))
    finally:
        serve.shutdown()
        ray.shutdown()
    names = list(rows)
    hops = [
        {
            "hop": f"{b} - {a_}",
            "ttft_ms": round(rows[b]["ttft_ms_p50"] - rows[a_]["ttft_ms_p50"], 2),
            "per_token_ms": round(rows[b]["gap_ms_p50"] - rows[a_]["gap_ms_p50"], 3),
        }
        for a_, b in zip(names, names[1:])
    ]
    res = {"preset": a.preset, "dtype": a.dtype, "tokens": a.tokens, "requests": a.requests, "rows": rows, "hops": hops}
    from pathlib import Path

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("| path | TTFT p50 ms | gap between outputs p50 ms |\n|---|---:|---:|")
    for n, r in rows.items():
        print(f"| {n} | {r['ttft_ms_p50']} | {r['gap_ms_p50']} |")
    print("\n| hop | + TTFT ms | + per token ms |\n|---|---:|---:|")
    for h in hops:
        print(f"| {h['hop']} | {h['ttft_ms']} | {h['per_token_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
