"""What a structured-output mask costs per step, by grammar engine and batch size.

    python -m benchmarks.grammar [--batch 1 16 64] [--steps 40] [--out DIR]

Each row of a batch walks a JSON schema (nested object, enums, bounded integers and strings, an
array) by sampling random allowed tokens, seeded; every step computes all rows' bitmasks and
applies them to [rows, 32000] float32 logits, as the engine does. Reported per step (mean, p90)
and per row, and the compile time of one schema:

    llguidance (one by one)     LLMatcher.unsafe_compute_mask per row (what the engine does: model/grammar.py)
    llguidance (executor)       LLExecutor over the rows, on its threads
    xgrammar                    GrammarMatcher.fill_next_token_bitmask per row, if xgrammar imports

The vocabulary is the Mixtral tokenizer mixserve ships. Writes grammar.json and grammar.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from model.grammar import GrammarBatch, StructuredOutput, _token_bytes, apply_mask, compiler_for
from model.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 16},
        "colour": {"enum": ["red", "green", "blue", "dark grey"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 4},
        "owner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "score": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["ok", "score"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "colour", "tags", "owner"],
    "additionalProperties": False,
}


def pick(allowed: torch.Tensor, rng: random.Random) -> int:
    ids = allowed.nonzero()[:, 0].tolist()
    return ids[rng.randrange(len(ids))]


def run_llguidance(tok: Tokenizer, batch: int, steps: int, parallel: bool, seed: int) -> dict:
    import llguidance
    import llguidance.torch as llg_torch

    V = tok.vocab_size
    comp = compiler_for(tok, V)
    c = StructuredOutput.json_schema(SCHEMA, "bench")
    t0 = time.perf_counter()
    comp.check(StructuredOutput.json_schema({**SCHEMA, "description": f"{seed}-{time.time_ns()}"}, "bench"))  # a miss
    compile_s = time.perf_counter() - t0
    rows = [comp.matcher(c) for _ in range(batch)]
    masks = GrammarBatch(V)
    executor = llguidance.LLExecutor(num_threads=min(2, os.cpu_count() or 1))
    rngs = [random.Random(seed + i) for i in range(batch)]
    logits = torch.randn(batch, V)
    times = []
    for _ in range(steps):
        live = [i for i, g in enumerate(rows) if not g.done]
        if not live:
            break
        t0 = time.perf_counter()
        if parallel:
            bm = torch.empty(len(live), (V + 31) // 32, dtype=torch.int32)
            llg_torch.fill_next_token_bitmask_par(executor, [(rows[i].m, j) for j, i in enumerate(live)], bm)
            allowed = ((bm[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).view(len(live), -1)[:, :V].bool()
        else:
            allowed = masks.mask([rows[i] for i in live])
        apply_mask(logits[: len(live)], list(range(len(live))), allowed)
        times.append((time.perf_counter() - t0, len(live)))
        for j, i in enumerate(live):
            rows[i].consume(pick(allowed[j], rngs[i]))
    return summary(times, compile_s)


def run_xgrammar(tok: Tokenizer, batch: int, steps: int, seed: int) -> dict | None:
    try:
        import xgrammar as xgr
    except Exception:  # noqa: BLE001 - optional: not a dependency of mixserve
        return None
    V = tok.vocab_size
    pieces, _ = _token_bytes(tok, V)
    info = xgr.TokenizerInfo(pieces, vocab_type=xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[tok.eos_id])
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    rows = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bm = xgr.allocate_token_bitmask(batch, V)
    rngs = [random.Random(seed + i) for i in range(batch)]
    logits = torch.randn(batch, V)
    times = []
    for _ in range(steps):
        live = [i for i, m in enumerate(rows) if not m.is_terminated()]
        if not live:
            break
        t0 = time.perf_counter()
        for j, i in enumerate(live):
            rows[i].fill_next_token_bitmask(bm, j)
        lg = logits[: len(live)].clone()
        xgr.apply_token_bitmask_inplace(lg, bm[: len(live)])
        times.append((time.perf_counter() - t0, len(live)))
        for j, i in enumerate(live):
            allowed = torch.isfinite(lg[j])
            rows[i].accept_token(pick(allowed, rngs[i]))
    return summary(times, compile_s)


def summary(times: list[tuple[float, int]], compile_s: float) -> dict:
    per_step = [t for t, _ in times]
    per_row = [t / n for t, n in times]
    return {
        "steps": len(times),
        "step_ms_mean": 1e3 * statistics.fmean(per_step),
        "step_ms_p90": 1e3 * sorted(per_step)[int(0.9 * (len(per_step) - 1))],
        "row_ms_mean": 1e3 * statistics.fmean(per_row),
        "compile_ms": 1e3 * compile_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = Tokenizer()
    results = []
    for b in a.batch:
        for name, fn in [
            ("llguidance (one by one)", lambda b=b: run_llguidance(tok, b, a.steps, False, a.seed)),
            ("llguidance (executor)", lambda b=b: run_llguidance(tok, b, a.steps, True, a.seed)),
            ("xgrammar", lambda b=b: run_xgrammar(tok, b, a.steps, a.seed)),
        ]:
            print(f"[grammar] {name}, batch {b}", file=sys.stderr, flush=True)
            r = fn()
            if r is not None:
                results.append({"engine": name, "batch": b} | r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpu": _cpu(), "cpus": os.cpu_count(), "torch": torch.__version__}
    (out / "grammar.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    lines = [
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs; vocabulary 32000; {a.steps} steps at most",
        "",
        "| engine | batch | mask per step, mean (ms) | p90 (ms) | per row (ms) | compile (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {r['batch']} | {r['step_ms_mean']:.2f} | {r['step_ms_p90']:.2f} | "
            f"{r['row_ms_mean']:.3f} | {r['compile_ms']:.1f} |"
        )
    (out / "grammar.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
