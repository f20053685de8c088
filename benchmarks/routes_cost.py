"""A/B of the routed-experts capture: `python benchmarks/routes_cost.py SRC_DIR on|off` runs the in-process
engine of SRC_DIR (a checkout) on `mini`, float32, 64 prompts x 32 greedy tokens, best of 3."""

import os
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
from model.sampling import SamplingParams
from router.engine import EngineConfig, LLMEngine

eng = LLMEngine.local(
    os.path.expanduser("~/.cache/mixserve/mini"), "float32", EngineConfig(max_num_batched_tokens=1024)
)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 30000, (64,), generator=g).tolist() for _ in range(64)]
kw = dict(max_tokens=32, temperature=0, ignore_eos=True)
if sys.argv[2] == "on":
    kw.update(return_routed_experts=True, return_prompt_routed_experts=True)
sp = SamplingParams(**kw)
eng.generate(prompts[:4], sp)
best = 1e9
for _ in range(3):
    t = time.perf_counter()
    eng.generate(prompts, sp)
    best = min(best, time.perf_counter() - t)
print(sys.argv[1], sys.argv[2], f"{64 * 32 / best:.1f} tok/s (best of 3)")
