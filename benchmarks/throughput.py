"""Generated tokens/s of the in-process engine vs the disaggregated one (experts as Ray actors),
side by side in one run, at several concurrencies.

    python -m benchmarks.throughput [--presets tiny mini] [--concurrency 1 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import ray
import torch

from model.checkpoint import Checkpoint
from model.model import MixtralDense
from model.sampling import SamplingParams
from model.tiny import preset_config, write_checkpoint
from router.engine import EngineConfig, LLMEngine


def workload(tok, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 16..128 tokens, seeded."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 129, (n,), generator=g).tolist()
    return [[tok.bos_id] + torch.randint(3, 32000, (L - 1,), generator=g).tolist() for L in lens]


def run(engine: LLMEngine, prompts, max_tokens: int) -> float:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    t = time.perf_counter()
    outs = engine.generate(prompts, sp)
    return sum(o.completion_tokens for o in outs) / (time.perf_counter() - t)


def main(argv=None) -> int:
    from cluster.ray_engine import ExpertsConfig, RayExperts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "mini"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    a = ap.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    for preset in a.presets:
        d = tempfile.mkdtemp(prefix=f"mixserve-{preset}-")
        write_checkpoint(d, preset_config(preset))
        local = LLMEngine.local(d, "auto", EngineConfig())
        ckpt = Checkpoint(d)
        experts = RayExperts(d, ckpt.config.num_local_experts, "auto", ExpertsConfig(num_cpus=0))
        experts.wait_ready()
        dis = LLMEngine(MixtralDense.from_checkpoint(ckpt), experts, local.tokenizer, EngineConfig(num_microbatches=2))
        for c in a.concurrency:
            prompts = workload(local.tokenizer, c)
            tl = run(local, prompts, a.max_tokens)
            td = run(dis, prompts, a.max_tokens)
            row = {
                "preset": preset,
                "concurrency": c,
                "in_process_tok_s": round(tl, 1),
                "disaggregated_tok_s": round(td, 1),
                "ratio": round(td / tl, 3),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        experts.shutdown()
    ray.shutdown()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"dtype": "bfloat16", "max_tokens": a.max_tokens, "rows": rows}, f, indent=2)
    print("| preset | concurrency | in-process tok/s | disaggregated tok/s | ratio |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['concurrency']} | {r['in_process_tok_s']} | {r['disaggregated_tok_s']} "
            f"| {r['ratio']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
