"""TTFT and tokens/s through the OpenAI HTTP endpoint of a running server (e.g. `make serve`).

python -m benchmarks.http [--url http://127.0.0.1:8000/v1] [--model tiny] [--concurrency 1 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import openai


def one(client, model: str, prompt: str, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    ttft = None
    for ch in client.completions.create(
        model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True, extra_body={"ignore_eos": True}
    ):
        if ttft is None and ch.choices and ch.choices[0].text:
            ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    client = openai.OpenAI(base_url=a.url, api_key="unused", max_retries=0, timeout=600)
    one(client, a.model, "warm up", 2)
    print("| concurrency | TTFT p50 ms | output tok/s (aggregate) |\n|---:|---:|---:|")
    for c in a.concurrency:
        res: list = [None] * c

        def run(i, res=res):
            res[i] = one(client, a.model, f"Request {i} asks about things", a.max_tokens)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        print(f"| {c} | {statistics.median(r[0] for r in res) * 1e3:.1f} | {c * a.max_tokens / dt:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
