"""`python -m benchmarks.gpu`: the CUDA path measured in one short run, without Ray.

    python -m benchmarks.gpu [--device cuda] [--shape mixtral-8x7b|tiny] [--layers 2]
                             [--batches 1 8 32 64 128 256] [--prefill 2048] [--out DIR]

Writes random bf16 weights at the shape once (one safetensors file per layer, drawn on the device), then:
  ffn        one expert's SwiGLU (`ExpertFFN`, as the workers run it) against a cuBLAS GEMM of the same
             [n, D] x [D, F] shape: TFLOP/s and their ratio, n = 64 .. 4096 tokens
  local      mixserve's engine (`LLMEngine`, the serving loop) with in-process experts on the device:
             decode tokens/s at each batch size (prompts of --context tokens), a --prefill prompt's time,
             and the engine's step profile per layer
  layer      one layer's attention and the combine of its experts' outputs at decode batch 64, timed
             with the device synchronised around them
  dataplane  an expert-worker process (this module, `--serve-experts`) holding all experts of every
             layer behind mixserve's data plane (`ChannelServer`) on loopback: the round trip of a
             64-token x D batch through an echo replica against the time of its copies alone
             (device -> pinned host -> device, both ends), then the engine with its experts in that
             process: decode tokens/s and the per-layer round trip
  memory     each process's device memory (allocated after loading, peak)
One JSON and one markdown table under --out (default $OUT where set, else benchmarks/results). Every
section prints progress and records its own error; the worker process is always stopped; the exit
status is 1 when a section failed. `--device cpu --shape tiny` runs the same code in seconds (the test).

The GPU machine has torch and safetensors but not pydantic, llguidance or mistral-common, which the
engine imports: `python -m benchmarks.gpu --fetch-wheels .whl` downloads them for its Python (3.12),
to carry there and install with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from benchmarks.harness import targets_table
from model.checkpoint import Checkpoint, dense_names, expert_names
from model.config import MixtralConfig, resolve_device
from model.presets import PRESETS

WHEELS = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "pydantic-extra-types",
    "mistral-common",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "llguidance",
)


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int, warm: int = 2) -> float:
    """Median seconds of `fn()` with the device synchronised around each call."""
    for _ in range(warm):
        fn()
    sync(device)
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        xs.append(time.perf_counter() - t)
    return sorted(xs)[len(xs) // 2]


# ---------------------------------------------------------------- the checkpoint


def write_weights(path: Path, cfg: MixtralConfig, device: torch.device, seed: int = 0) -> None:
    """config.json and one safetensors file per layer (+ the index), random weights in cfg's dtype, drawn
    on `device` (seconds for GBs on a GPU) one tensor at a time: host memory holds one layer at most."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    g = torch.Generator(device=device).manual_seed(seed)
    names = dense_names(cfg)
    groups: dict[str, dict[str, tuple]] = {"model-dense.safetensors": {}}
    for n, shape in names.items():
        layer = n.split(".")[2] if n.startswith("model.layers.") else None
        key = f"model-layer{int(layer):03d}.safetensors" if layer is not None else "model-dense.safetensors"
        groups.setdefault(key, {})[n] = shape
    for l in range(cfg.num_hidden_layers):
        for e in range(cfg.num_local_experts):
            groups[f"model-layer{l:03d}.safetensors"].update(expert_names(cfg, l, e))
    weight_map, total = {}, 0
    for i, (fname, tensors) in enumerate(groups.items()):
        part = {}
        for n, shape in tensors.items():
            if n.endswith("norm.weight"):
                t = torch.ones(shape, device=device)
            else:
                t = torch.randn(shape, generator=g, device=device) / (1 if "embed" in n else shape[-1] ** 0.5)
            part[n] = t.to(cfg.dtype).cpu().contiguous()
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * t.element_size() for t in part.values())
        log(f"weights: {fname} ({i + 1}/{len(groups)}, {total / 2**30:.1f} GiB so far)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- sections


def bench_ffn(cfg: MixtralConfig, device: torch.device, tokens: list[int], reps: int) -> list[dict]:
    """One expert's FFN vs a GEMM of the same shape, in TFLOP/s (the FFN does 3 such GEMMs' work)."""
    from model.moe import ExpertFFN

    D, F = cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator(device=device).manual_seed(1)
    w1, w3 = (torch.randn(F, D, generator=g, device=device, dtype=cfg.dtype) / D**0.5 for _ in range(2))
    w2 = torch.randn(D, F, generator=g, device=device, dtype=cfg.dtype) / F**0.5
    ffn = ExpertFFN(w1, w2, w3)
    wt = w1.t().contiguous()  # [D, F]: x @ wt, the plain GEMM
    rows = []
    for n in tokens:
        x = torch.randn(n, D, generator=g, device=device, dtype=cfg.dtype)
        t_ffn = timed(lambda x=x: ffn(x), device, reps)
        t_mm = timed(lambda x=x: torch.mm(x, wt), device, reps)
        rows.append(
            {
                "tokens": n,
                "ffn_tflops": round(6 * n * D * F / t_ffn / 1e12, 3),
                "gemm_tflops": round(2 * n * D * F / t_mm / 1e12, 3),
                "ffn_ms": round(t_ffn * 1e3, 4),
            }
        )
        rows[-1]["ratio"] = round(rows[-1]["ffn_tflops"] / rows[-1]["gemm_tflops"], 3)
        log(f"ffn: {n} tokens {rows[-1]['ffn_tflops']} vs GEMM {rows[-1]['gemm_tflops']} TFLOP/s")
    return rows


def decode(engine, cfg: MixtralConfig, batches: list[int], context: int, steps: int, label: str) -> list[dict]:
    """Decode tokens/s of `engine` at each batch size: B requests of `context` prompt tokens prefilled
    first (not timed), then `steps` engine steps of B tokens each."""
    from model.sampling import SamplingParams

    g = torch.Generator().manual_seed(2)
    rows = []
    for B in batches:
        ids = []
        for _ in range(B):
            prompt = [1] + torch.randint(3, cfg.vocab_size, (context - 1,), generator=g).tolist()
            sp = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
            ids.append(engine.add_request(prompt, sp))
        while engine.num_waiting or any(not engine.seqs[i].output_ids for i in ids if i in engine.seqs):
            engine.step()
        engine.step()  # every row decoding
        before = engine.profile.snapshot()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        dt = time.perf_counter() - t
        after = engine.profile.snapshot()
        for i in ids:
            engine.abort(i)
        while engine.has_unfinished():
            engine.step()
        layers = max(1, after["layers"] - before["layers"])
        per_layer = {
            k: round(1e3 * (after[k] - before[k]) / layers, 4) for k in ("dense", "dispatch", "wait", "combine")
        }
        rows.append(
            {
                "batch": B,
                "tokens_per_s": round(B * steps / dt, 1),
                "step_ms": round(1e3 * dt / steps, 3),
                "ms_per_layer": per_layer,
            }
        )
        log(f"{label}: batch {B}: {rows[-1]['tokens_per_s']} tokens/s, {rows[-1]['step_ms']} ms per step")
    return rows


def prefill(engine, cfg: MixtralConfig, n: int) -> dict:
    """Time to the first token of one n-token prompt (the engine's token budget holds it whole)."""
    from model.sampling import SamplingParams

    g = torch.Generator().manual_seed(3)
    prompt = [1] + torch.randint(3, cfg.vocab_size, (n - 1,), generator=g).tolist()
    sp = SamplingParams(max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True)  # computed whole, twice
    for _ in ("warm-up", "timed"):
        engine.add_request(prompt, sp)
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        dt = time.perf_counter() - t
    out = {"tokens": n, "ttft_ms": round(1e3 * dt, 2), "prefill_tokens_per_s": round(n / dt, 1)}
    log(f"prefill: {n} tokens in {out['ttft_ms']} ms")
    return out


def bench_layer(engine, cfg: MixtralConfig, batch: int, context: int, reps: int) -> dict:
    """Layer 0's attention (qkv, rotary, paged attention, o) and the combine of top-k expert outputs
    at decode batch `batch` over `context` cached tokens each."""
    from model.attention import build_attn_meta
    from model.kernels import rope_cos_sin
    from router.dispatch import combine, plan_dispatch

    dense, dev = engine.dense, engine.device
    need = batch * context
    if need > engine.kv.num_slots:
        raise ValueError(f"batch {batch} x context {context} exceeds the KV pool ({engine.kv.num_slots} slots)")
    meta = build_attn_meta(
        [(list(range(i * context, (i + 1) * context)), 1) for i in range(batch)], cfg.sliding_window
    ).to(dev)
    g = torch.Generator(device=dev).manual_seed(4)
    x = torch.randn(batch, cfg.hidden_size, generator=g, device=dev, dtype=dense.dtype)
    cos, sin = rope_cos_sin(meta.positions, cfg.head_dim, cfg.rope_theta, dense.dtype)
    lw = dense.w.layers[0]
    t_attn = timed(lambda: dense.attention(lw, 0, x, meta, engine.kv, cos, sin), dev, reps)
    logits = torch.randn(batch, cfg.num_local_experts, generator=g, device=dev)
    w, ids = torch.topk(torch.softmax(logits, -1), cfg.num_experts_per_tok, dim=-1)
    plan = plan_dispatch(w / w.sum(-1, keepdim=True), ids, cfg.num_local_experts)
    outs = {
        e: torch.randn(len(r), cfg.hidden_size, generator=g, device=dev, dtype=dense.dtype)
        for e, r in plan.rows.items()
    }
    t_comb = timed(lambda: combine(x, plan, outs), dev, reps)
    out = {
        "batch": batch,
        "context": context,
        "attention_ms": round(t_attn * 1e3, 4),
        "combine_ms": round(t_comb * 1e3, 4),
        "attention_plus_combine_ms": round((t_attn + t_comb) * 1e3, 4),
    }
    log(f"layer: batch {batch}: attention {out['attention_ms']} ms + combine {out['combine_ms']} ms")
    return out


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        import resource

        return {"max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    return {
        "allocated_mib": round(torch.cuda.memory_allocated(device) / 2**20, 1),
        "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
    }


# ---------------------------------------------------------------- the expert-worker process


class EchoWorker:
    """A replica that answers each batch with itself, copied on its device: the data plane's own cost."""

    def __init__(self, cfg: MixtralConfig, experts: list[int], device: torch.device):
        self.cfg, self.experts, self.device = cfg, experts, device

    def run(self, layer: int, batches: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {e: x.to(self.device, non_blocking=True).clone() for e, x in batches.items()}


def serve_experts(a) -> int:
    """The worker process: every expert of every layer, and an echo replica, each behind a ChannelServer
    on 127.0.0.1; their ports (and later this process's memory) go to --ready as JSON lines."""
    from cluster.runtime.channel import ChannelServer, FrameLimits
    from workers.expert import ExpertWorker

    device = resolve_device(a.device)
    secret = bytes.fromhex(os.environ["MIXSERVE_BENCH_SECRET"])
    cfg = Checkpoint(a.serve_experts).config
    experts = list(range(cfg.num_local_experts))
    worker = ExpertWorker(a.serve_experts, experts, a.dtype, device=device)
    echo = EchoWorker(cfg, experts, device)
    servers = [
        ChannelServer(w, "127.0.0.1", secret, FrameLimits.for_worker(w, 1 << 16), frame_timeout_s=120)
        for w in (worker, echo)
    ]
    ready = Path(a.ready)
    ready.write_text(
        json.dumps({"experts": servers[0].address[1], "echo": servers[1].address[1], **memory(device)}) + "\n"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.2) and os.getppid() != 1:
        pass
    with ready.open("a") as f:
        f.write(json.dumps({"final": True, **memory(device)}) + "\n")
    for s in servers:
        s.close()
    return 0


class ChannelBackend:
    """The engine's expert backend over one data-plane connection (one replica holding every expert)."""

    def __init__(self, client):
        self.client, self.calls, self.seconds = client, 0, 0.0

    def submit(self, req):
        t0 = time.perf_counter()  # the round trip counts the send
        return _Pending(self, self.client.send(req.layer, req.batches), t0)


class _Pending:
    """One call in flight on the ChannelBackend: its result, and its round trip counted on collection."""

    __slots__ = ("backend", "call", "t0")

    def __init__(self, backend: ChannelBackend, call: int, t0: float):
        self.backend, self.call, self.t0 = backend, call, t0

    def result(self):
        out = self.backend.client.result(self.call)
        self.backend.calls += 1
        self.backend.seconds += time.perf_counter() - self.t0
        return out


def start_worker(model_dir: Path, a, secret: bytes) -> tuple[subprocess.Popen, Path]:
    ready = Path(tempfile.mkdtemp(prefix="mixserve-gpu-worker-")) / "ready.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--serve-experts", str(model_dir), "--ready", str(ready)]
    cmd += ["--device", a.device, "--dtype", a.dtype]
    env = {**os.environ, "MIXSERVE_BENCH_SECRET": secret.hex()}
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + a.worker_timeout_s
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"the expert-worker process exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the expert-worker process was not ready in {a.worker_timeout_s} s")
        time.sleep(0.2)
    return proc, ready


def bench_dataplane(cfg, device, a, model_dir: Path, secret: bytes, result: dict) -> None:
    from cluster.runtime.channel import ChannelClient
    from router.engine import EngineConfig, LLMEngine

    proc, ready = start_worker(model_dir, a, secret)
    try:
        info = json.loads(ready.read_text().splitlines()[0])
        result["memory"]["expert_worker_after_load"] = {k: v for k, v in info.items() if k not in ("experts", "echo")}
        echo = ChannelClient(("127.0.0.1", info["echo"]), 120, secret, device)
        x = torch.randn(a.wire_tokens, cfg.hidden_size, device=device, dtype=cfg.dtype)
        t_rt = timed(lambda: echo.result(echo.send(0, {0: x})), device, a.reps * 4)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=device.type == "cuda")
        back = torch.empty_like(x)

        def copies():
            host.copy_(x, non_blocking=True)
            sync(device)
            back.copy_(host, non_blocking=True)

        t_copy = 2 * timed(copies, device, a.reps * 4)  # both ends: each copies out and in once
        echo.close()
        result["dataplane"] = {
            "tokens": a.wire_tokens,
            "bytes": x.numel() * x.element_size(),
            "round_trip_ms": round(t_rt * 1e3, 4),
            "copies_ms": round(t_copy * 1e3, 4),
            "round_trip_over_copies": round(t_rt / t_copy, 3),
        }
        log(
            f"dataplane: {a.wire_tokens} x {cfg.hidden_size} round trip {t_rt * 1e3:.3f} ms, "
            f"copies {t_copy * 1e3:.3f} ms"
        )
        from model.model import MixtralDense

        client = ChannelClient(("127.0.0.1", info["experts"]), 120, secret, device)
        backend = ChannelBackend(client)
        dense = MixtralDense.from_checkpoint(Checkpoint(model_dir), a.dtype, device)
        engine = LLMEngine(dense, backend, None, engine_config(a, EngineConfig))
        calls0 = backend.calls
        result["remote"] = decode(engine, cfg, a.batches, a.context, a.steps, "remote experts")
        result["remote_round_trip_ms_per_layer"] = round(1e3 * backend.seconds / max(1, backend.calls - calls0), 4)
        client.close()
        del engine, dense
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        lines = ready.read_text().splitlines() if ready.exists() else []
        final = [json.loads(s) for s in lines if '"final"' in s]
        if final:
            result["memory"]["expert_worker_final"] = {k: v for k, v in final[0].items() if k != "final"}


def engine_config(a, cls):
    return cls(
        max_num_seqs=max(a.batches),
        max_num_batched_tokens=max(a.prefill + 8, 2048),
        kv_cache_tokens=max(a.batches) * (a.context + a.steps + 32) + a.prefill + 64,
        block_size=16,
    )


# ---------------------------------------------------------------- the run


def run(a) -> tuple[dict, list[str]]:
    device = resolve_device(a.device)
    over = {"num_hidden_layers": a.layers} if a.layers else {}
    cfg = MixtralConfig(**{**PRESETS[a.shape], **over, "torch_dtype": a.dtype})
    t_start = time.monotonic()
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "shape": a.shape,
        "layers": cfg.num_hidden_layers,
        "dtype": a.dtype,
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads")}
        | {k: getattr(cfg, k) for k in ("num_key_value_heads", "num_local_experts", "num_experts_per_tok")},
        "batches": a.batches,
        "context": a.context,
        "memory": {},
        "errors": {},
    }
    errors: list[str] = []

    def section(name: str, fn) -> None:
        left = a.time_budget_s - (time.monotonic() - t_start)
        if left < 20:
            result["errors"][name] = f"skipped: {left:.0f} s of the time budget left"
            log(f"{name}: skipped (time budget)")
            return
        log(f"{name}: start")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
            traceback.print_exc()
            result["errors"][name] = f"{type(e).__name__}: {e}"
            errors.append(name)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="mixserve-gpu-"))
    model_dir = work / f"{a.shape}-{cfg.num_hidden_layers}l-{a.dtype}"
    if not (model_dir / "model.safetensors.index.json").exists():
        t = time.monotonic()
        write_weights(model_dir, cfg, device)
        result["write_weights_s"] = round(time.monotonic() - t, 1)
    result["ffn"] = []
    section("ffn", lambda: result.__setitem__("ffn", bench_ffn(cfg, device, a.ffn_tokens, a.reps)))
    holder: dict = {}

    def local() -> None:
        from cluster.build import local_engine
        from router.engine import EngineConfig

        t = time.monotonic()
        engine = local_engine(str(model_dir), a.dtype, engine_config(a, EngineConfig), 8, a.device)
        result["load_s"] = round(time.monotonic() - t, 1)
        result["memory"]["local_engine"] = memory(device)
        holder["engine"] = engine
        result["local"] = decode(engine, cfg, a.batches, a.context, a.steps, "local experts")
        result["prefill"] = prefill(engine, cfg, a.prefill)

    section("local", local)
    section(
        "layer",
        lambda: result.__setitem__("layer", bench_layer(holder["engine"], cfg, a.layer_batch, a.context, a.reps * 4)),
    )
    holder.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    secret = os.urandom(32)
    section("dataplane", lambda: bench_dataplane(cfg, device, a, model_dir, secret, result))
    result["memory"]["attention_process_peak"] = memory(device)
    result["targets"] = targets(result)
    result["seconds"] = round(time.monotonic() - t_start, 1)
    return result, errors


def targets(r: dict) -> list[dict]:
    out = []
    big = [x for x in r.get("ffn", []) if x["tokens"] >= 256]
    if big:
        worst = min(x["ratio"] for x in big)
        out.append(
            {"target": "expert FFN vs GEMM TFLOP/s, >= 256 tokens", "want": ">= 0.7", "got": worst, "met": worst >= 0.7}
        )
    if "layer" in r:
        got = r["layer"]["attention_plus_combine_ms"]
        out.append(
            {
                "target": f"attention + combine per layer, decode batch {r['layer']['batch']}",
                "want": "< 1 ms",
                "got": got,
                "met": got < 1,
            }
        )
    if "dataplane" in r:
        got = r["dataplane"]["round_trip_over_copies"]
        out.append({"target": "data-plane round trip / copy time", "want": "< 2", "got": got, "met": got < 2})
    return out


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        f"### CUDA path: {r['device']}, {r['dtype']}, torch {r['torch']} (CUDA {r['cuda']})",
        "",
        f"Shape `{r['shape']}`: hidden {c['hidden_size']}, FFN {c['intermediate_size']}, "
        f"{c['num_attention_heads']} heads / "
        f"{c['num_key_value_heads']} KV, {c['num_local_experts']} experts top-{c['num_experts_per_tok']}, "
        f"{r['layers']} layers; decode prompts of {r['context']} tokens. `python -m benchmarks.gpu`, {r['seconds']} s.",
        "",
        "| batch | local experts tok/s | step ms | remote experts (data plane) tok/s | step ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    remote = {x["batch"]: x for x in r.get("remote", [])}
    for x in r.get("local", []):
        y = remote.get(x["batch"], {})
        lines.append(
            f"| {x['batch']} | {x['tokens_per_s']} | {x['step_ms']} | {y.get('tokens_per_s', '')} "
            f"| {y.get('step_ms', '')} |"
        )
    if "prefill" in r:
        p = r["prefill"]
        lines += ["", f"Prefill of {p['tokens']} tokens: {p['ttft_ms']} ms ({p['prefill_tokens_per_s']} tokens/s)."]
    if "remote_round_trip_ms_per_layer" in r:
        lines += [
            "",
            f"Remote experts: {r['remote_round_trip_ms_per_layer']} ms per layer round trip (mean, submit to result).",
        ]
    if r.get("ffn"):
        lines += ["", "| expert FFN tokens | FFN TFLOP/s | GEMM TFLOP/s | ratio |", "|---:|---:|---:|---:|"]
        lines += [f"| {x['tokens']} | {x['ffn_tflops']} | {x['gemm_tflops']} | {x['ratio']} |" for x in r["ffn"]]
    if "layer" in r:
        x = r["layer"]
        lines += [
            "",
            f"Layer 0 at decode batch {x['batch']} ({x['context']} cached tokens each): "
            f"attention {x['attention_ms']} ms, combine {x['combine_ms']} ms.",
        ]
    if "dataplane" in r:
        x = r["dataplane"]
        lines += [
            "",
            f"Data plane, loopback, {x['tokens']} tokens ({x['bytes'] // 1024} KiB): "
            f"echo round trip {x['round_trip_ms']} ms, "
            f"its copies alone {x['copies_ms']} ms ({x['round_trip_over_copies']}x).",
        ]
    if r["memory"]:
        lines += ["", "Memory: " + "; ".join(f"{k} {v}" for k, v in r["memory"].items()) + "."]
    lines += targets_table(r["targets"])
    if r["errors"]:
        lines += ["", "Sections that did not finish: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items())]
    return "\n".join(lines) + "\n"


def fetch_wheels(folder: str) -> int:
    """pip download of what the engine imports that the GPU machine lacks, at the versions installed
    here, for CPython 3.12 on manylinux x86-64 (the device tool's recipe)."""
    from importlib.metadata import version

    plats = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", "-d", folder]
    for p in plats:
        cmd += ["--platform", p]
    cmd += [f"{name}=={version(name)}" for name in WHEELS]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="mixtral-8x7b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, help="default: 2 for mixtral-8x7b, the preset's otherwise")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--context", type=int, default=128, help="prompt tokens of each decoding request")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--layer-batch", type=int, default=64)
    p.add_argument("--wire-tokens", type=int, default=64)
    p.add_argument("--ffn-tokens", nargs="+", type=int, default=[64, 256, 1024, 4096])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--time-budget-s", type=float, default=420, help="sections not started by then are skipped")
    p.add_argument("--worker-timeout-s", type=float, default=240)
    p.add_argument("--workdir", help="where the weights are written (kept: a rerun reuses them)")
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    p.add_argument("--serve-experts", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--fetch-wheels", metavar="DIR", help="download the wheels the GPU machine lacks, and stop")
    a = p.parse_args(argv)
    if a.fetch_wheels:
        return fetch_wheels(a.fetch_wheels)
    if a.serve_experts:
        return serve_experts(a)
    if a.layers is None and a.shape == "mixtral-8x7b":
        a.layers = 2
    torch.manual_seed(0)
    result, errors = run(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{a.shape}-{'cuda' if a.device.startswith('cuda') else a.device}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {out / stem}.json and .md" + (f"; failed: {', '.join(errors)}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
